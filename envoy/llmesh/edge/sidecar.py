"""Envoy in Kubernetes pods: the mTLS sidecar of every service, and the edge with mTLS upstreams.

Each service pod (registry, scheduler, auth, workers) runs its app on loopback and an Envoy
sidecar beside it:

- `ingress`: the pod's only port that other pods reach, `0.0.0.0:<mtls_port>`; TLS 1.3 with a
  client certificate required, signed by the mesh CA and naming an identity allowed to call this
  service (spiffe://llmesh/<identity>); relayed as HTTP/2 to the app on `127.0.0.1:<app_port>`.
- `egress_<service>`: for each service the app dials, `127.0.0.1:<that service's port>`, relayed
  over mTLS to that service's pods (a headless Service: one endpoint per ready pod, balanced per
  request). So the app dials its peers at the default loopback addresses and never sees TLS.
- `probes`: plaintext `0.0.0.0:15021` for the kubelet, with two routes only: the gRPC health
  service of the app (the kubelet's gRPC probes) and `/healthz/ready`, answered by Envoy itself.

The edge keeps its public listener and adds the same probe listener; every upstream cluster
(control plane and the EDS-fed workers) speaks mTLS with the edge's identity.

Certificates come from the Secret `llmesh-mtls-<identity>` mounted at `TLS_DIR` (`ca.crt`,
`tls.crt`, `tls.key`: the layout `llmesh certs` and cert-manager both write); Envoy watches the
directory and picks up rotated certificates without a restart.

python -m llmesh.edge.sidecar --out k8s/base/envoy            # render every pod's config
python -m llmesh.edge.sidecar --out k8s/base/envoy --check    # fail if they are stale
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from betterproto2 import Casing
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    HttpProtocolOptions,
    Node,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.endpoint.v3 import Endpoint as EnvoyEndpoint
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    Route,
    RouteAction,
    RouteActionMaxStreamDuration,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
)

from llmesh.common.tls import EDGE_IDENTITY
from llmesh.edge.bootstrap import bootstrap as edge_bootstrap
from llmesh.edge.filters import router_filter, typed
from llmesh.edge.mtls import downstream_tls, upstream_tls
from llmesh.edge.settings import EdgeSettings
from llmesh.edge.workers import MAX_UPSTREAM_REQUESTS, UPSTREAM_OPTIONS_KEY, http2_upstream_options

# Where every pod mounts its Secret `llmesh-mtls-<identity>` (ca.crt, tls.crt, tls.key).
TLS_DIR = "/etc/llmesh/tls"
# Where pods mount the descriptor set and the rendered Envoy configs (ConfigMaps).
DESCRIPTOR_PATH = "/etc/llmesh/envoy/descriptor/llmesh_descriptor.pb"
# The kubelet's plaintext port on every Envoy: the app's gRPC health and Envoy's own readiness.
PROBE_PORT = 15021
READY_PATH = "/healthz/ready"
SECRET_PREFIX = "llmesh-mtls-"
HCM = "envoy.filters.network.http_connection_manager"
LOCAL_APP_CLUSTER = "local_app"


@dataclass(frozen=True)
class MeshService:
    """One service pod kind: its app's loopback port, its sidecar's mTLS port, who may call it and
    which services its app dials."""

    name: str
    app_port: int
    mtls_port: int
    clients: tuple[str, ...]
    dials: tuple[str, ...] = ()


# The mesh's call graph (also what the NetworkPolicies allow; tests check they agree).
MESH: dict[str, MeshService] = {
    "registry": MeshService("registry", 50052, 15052, clients=(EDGE_IDENTITY, "scheduler", "workers")),
    # The scheduler records usage with AuthService (RecordUsage); workers report a cancelled
    # stream's usage to the scheduler (Release).
    "scheduler": MeshService(
        "scheduler", 50054, 15054, clients=(EDGE_IDENTITY, "workers"), dials=("registry", "auth")
    ),
    "auth": MeshService("auth", 50053, 15053, clients=(EDGE_IDENTITY, "scheduler")),
    "workers": MeshService(
        "workers", 50060, 15060, clients=(EDGE_IDENTITY,), dials=("registry", "scheduler")
    ),
}


@dataclass(frozen=True)
class SidecarSettings:
    """What one service's sidecar config depends on."""

    service: str
    tls_dir: str = TLS_DIR
    probe_port: int = PROBE_PORT
    admin_port: int = 9901
    max_request_bytes: int = 10 * 1024 * 1024
    # Token streams may be quiet for long (a unary completion of a long answer); see EdgeSettings.
    stream_idle_timeout_s: float = 900.0
    connect_timeout_s: float = 2.0
    # Tests run sidecars on free ports and without cluster DNS: 0 / empty means the mesh's own
    # (MESH's ports; a peer at its headless Service name and mTLS port).
    mtls_port: int = 0
    app_port: int = 0
    peer_addresses: Mapping[str, str] = field(default_factory=dict)  # peer -> "host:port" to dial
    egress_ports: Mapping[str, int] = field(default_factory=dict)  # peer -> loopback port for the app

    def __post_init__(self) -> None:
        if self.service not in MESH:
            raise ValueError(f"service: unknown {self.service!r}; known: {sorted(MESH)}")

    @property
    def mesh(self) -> MeshService:
        """This service's place in the mesh, with the port overrides applied."""
        mesh = MESH[self.service]
        return dataclasses.replace(
            mesh, mtls_port=self.mtls_port or mesh.mtls_port, app_port=self.app_port or mesh.app_port
        )


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def _relay_route(name: str, cluster: str, match: RouteMatch) -> Route:
    return Route(
        name=name,
        match=match,
        route=RouteAction(
            cluster=cluster,
            # Streams live as long as the caller's deadline says; Envoy adds none of its own.
            timeout=timedelta(0),
            max_stream_duration=RouteActionMaxStreamDuration(grpc_timeout_header_max=timedelta(0)),
        ),
    )


def _connection_manager(
    stat_prefix: str, routes: list[Route], *, stream_idle_timeout_s: float
) -> HttpConnectionManager:
    return HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=HttpConnectionManagerCodecType.AUTO,
        route_config=RouteConfiguration(
            name=stat_prefix, virtual_hosts=[VirtualHost(name=stat_prefix, domains=["*"], routes=routes)]
        ),
        http_filters=[router_filter()],
        stream_idle_timeout=_seconds(stream_idle_timeout_s),
        request_timeout=timedelta(0),
        common_http_protocol_options=HttpProtocolOptions(idle_timeout=_seconds(3600)),
        # x-request-id and the other headers pass through untouched: the edge set them.
        preserve_external_request_id=True,
    )


def _listener(
    name: str,
    host: str,
    port: int,
    manager: HttpConnectionManager,
    *,
    buffer_limit: int,
    transport: TransportSocket | None = None,
) -> Listener:
    chain = FilterChain(filters=[Filter(name=HCM, typed_config=typed(manager))])
    if transport is not None:
        chain.transport_socket = transport
    return Listener(
        name=name,
        address=Address(socket_address=SocketAddress(address=host, port_value=port)),
        per_connection_buffer_limit_bytes=buffer_limit,
        filter_chains=[chain],
    )


def probe_listener(port: int, *, health_cluster: str | None) -> Listener:
    """Plaintext for the kubelet: `/healthz/ready` (Envoy is up and initialized) and, on service
    pods, the app's gRPC health service — nothing else is reachable without a certificate."""
    routes = [
        Route(
            name="envoy-ready",
            match=RouteMatch(path=READY_PATH),
            direct_response=DirectResponseAction(status=200, body=DataSource(inline_string="ready\n")),
        )
    ]
    if health_cluster is not None:
        routes.append(
            _relay_route("app-health", health_cluster, RouteMatch(prefix="/grpc.health.v1.Health/"))
        )
    manager = _connection_manager("probes", routes, stream_idle_timeout_s=60.0)
    return _listener("probes", "0.0.0.0", port, manager, buffer_limit=64 * 1024)


def _cluster(
    name: str,
    host: str,
    port: int,
    *,
    connect_timeout_s: float,
    buffer_limit: int,
    transport: TransportSocket | None = None,
) -> Cluster:
    cluster = Cluster(
        name=name,
        connect_timeout=_seconds(connect_timeout_s),
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[
                        LbEndpoint(
                            endpoint=EnvoyEndpoint(
                                address=Address(socket_address=SocketAddress(address=host, port_value=port))
                            )
                        )
                    ]
                )
            ],
        ),
        typed_extension_protocol_options={UPSTREAM_OPTIONS_KEY: typed(http2_upstream_options())},
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    max_connections=MAX_UPSTREAM_REQUESTS,
                    max_pending_requests=MAX_UPSTREAM_REQUESTS,
                    max_requests=MAX_UPSTREAM_REQUESTS,
                )
            ]
        ),
        per_connection_buffer_limit_bytes=buffer_limit,
    )
    if host == "127.0.0.1":
        cluster.type = ClusterDiscoveryType.STATIC
    else:
        # A headless Service: every ready pod's IP, re-resolved as pods come and go.
        cluster.type = ClusterDiscoveryType.STRICT_DNS
        cluster.dns_lookup_family = ClusterDnsLookupFamily.V4_PREFERRED
    if transport is not None:
        cluster.transport_socket = transport
    return cluster


def sidecar_bootstrap(settings: SidecarSettings) -> Bootstrap:
    """The sidecar of one service pod: mTLS ingress to the app, loopback egress to its peers."""
    mesh = settings.mesh
    limit = settings.max_request_bytes
    ingress = _connection_manager(
        f"{mesh.name}_ingress",
        [_relay_route("app", LOCAL_APP_CLUSTER, RouteMatch(prefix="/"))],
        stream_idle_timeout_s=settings.stream_idle_timeout_s,
    )
    listeners = [
        _listener(
            "ingress",
            "0.0.0.0",
            mesh.mtls_port,
            ingress,
            buffer_limit=limit,
            transport=downstream_tls(settings.tls_dir, mesh.clients),
        ),
        probe_listener(settings.probe_port, health_cluster=LOCAL_APP_CLUSTER),
    ]
    clusters = [
        _cluster(
            LOCAL_APP_CLUSTER,
            "127.0.0.1",
            mesh.app_port,
            connect_timeout_s=settings.connect_timeout_s,
            buffer_limit=limit,
        )
    ]
    for peer in mesh.dials:
        target = MESH[peer]
        egress = _connection_manager(
            f"egress_{peer}",
            [_relay_route(peer, peer, RouteMatch(prefix="/"))],
            stream_idle_timeout_s=settings.stream_idle_timeout_s,
        )
        egress_port = settings.egress_ports.get(peer, target.app_port)
        listeners.append(_listener(f"egress_{peer}", "127.0.0.1", egress_port, egress, buffer_limit=limit))
        host, _, port = settings.peer_addresses.get(peer, f"{peer}:{target.mtls_port}").rpartition(":")
        clusters.append(
            _cluster(
                peer,
                host,
                int(port),
                connect_timeout_s=settings.connect_timeout_s,
                buffer_limit=limit,
                transport=upstream_tls(settings.tls_dir, peer),
            )
        )
    return Bootstrap(
        node=Node(id=f"{mesh.name}-sidecar", cluster="llmesh"),
        admin=Admin(
            address=Address(socket_address=SocketAddress(address="127.0.0.1", port_value=settings.admin_port))
        ),
        static_resources=BootstrapStaticResources(listeners=listeners, clusters=clusters),
    )


def kubernetes_edge_settings(**overrides: Any) -> EdgeSettings:
    """The edge Deployment's settings: public listener on every address, control-plane services by
    their headless Service names at their pods' mTLS ports."""
    values: dict[str, Any] = {
        "listen_host": "0.0.0.0",
        "registry": f"registry:{MESH['registry'].mtls_port}",
        "auth": f"auth:{MESH['auth'].mtls_port}",
        "scheduler": f"scheduler:{MESH['scheduler'].mtls_port}",
        "descriptor_path": DESCRIPTOR_PATH,
        "node_id": "llmesh-edge",
        # The cluster's llmesh.yaml turns auth on: every public request is checked at the edge.
        "auth_enabled": True,
    }
    values.update(overrides)
    return EdgeSettings(**values)


def mesh_edge_bootstrap(
    settings: EdgeSettings, tls_dir: str = TLS_DIR, probe_port: int = PROBE_PORT
) -> Bootstrap:
    """The edge as llmesh.edge renders it, with mTLS to every upstream (workers included: EDS hands
    out their sidecars' mTLS ports) and the kubelet's probe listener."""
    config = edge_bootstrap(dataclasses.replace(settings, upstream_tls_dir=tls_dir))
    resources = config.static_resources
    assert resources is not None
    resources.listeners.append(probe_listener(probe_port, health_cluster=None))
    return config


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the edge's Lua script) as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str_representer)


def to_yaml(config: Bootstrap, what: str) -> str:
    """A bootstrap as YAML Envoy loads with `-c`."""
    header = (
        f"# Envoy bootstrap of {what}, rendered by llmesh.edge.sidecar.\n"
        "# Do not edit: run `make k8s-generate` (python -m llmesh.edge.sidecar).\n"
    )
    data = config.to_dict(casing=Casing.SNAKE)
    return header + yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100)


def rendered_files(edge: EdgeSettings | None = None, **sidecar: Any) -> dict[str, str]:
    """Every Envoy config a Kubernetes deployment mounts, by file name."""
    files = {"edge.yaml": to_yaml(mesh_edge_bootstrap(edge or kubernetes_edge_settings()), "the llmesh edge")}
    for name in MESH:
        settings = SidecarSettings(service=name, **sidecar)
        files[f"sidecar-{name}.yaml"] = to_yaml(sidecar_bootstrap(settings), f"the {name} sidecar")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmesh.edge.sidecar", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory for the rendered configs")
    parser.add_argument("--descriptor", type=Path, help="descriptor set to copy beside them (make gen's)")
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    ns = parser.parse_args(argv)
    wanted: dict[str, bytes] = {name: text.encode() for name, text in rendered_files().items()}
    if ns.descriptor is not None:
        wanted[Path(DESCRIPTOR_PATH).name] = ns.descriptor.read_bytes()
    stale = [
        name
        for name, data in wanted.items()
        if not (ns.out / name).is_file() or (ns.out / name).read_bytes() != data
    ]
    for name in stale:
        if not ns.check:
            ns.out.mkdir(parents=True, exist_ok=True)
            (ns.out / name).write_bytes(wanted[name])
        print(f"{'stale' if ns.check else 'wrote'}: {ns.out / name}", file=sys.stderr)
    return 1 if ns.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
