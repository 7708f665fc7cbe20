"""Render the Envoy bootstrap of the llmesh edge from EdgeSettings, with envoy-data-plane's types.

One public listener: native gRPC passes through to the service its path names; REST/JSON is
transcoded to the same RPCs. Inference RPCs go to the workers through the endpoint picker
(llmesh.edge.workers); public control-plane RPCs to their service's HTTP/2 cluster, actively
health-checked with the gRPC health protocol; internal RPCs have no route at all.
"""

from __future__ import annotations

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
    ClusterCommonLbConfig,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    HttpProtocolOptions,
    Node,
    SocketAddress,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    RetryPolicy,
    Route,
    RouteAction,
    RouteActionMaxStreamDuration,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    CheckSettings,
    ExtAuthz,
    ExtAuthzPerRoute,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpFilter,
    RequestIdExtension,
)
from envoy_data_plane.envoy.extensions.request_id.uuid.v3 import UuidRequestIdConfig
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
)
from envoy_data_plane.envoy.type.v3 import Percent

from llmesh.edge.descriptor import default_descriptor_path, http_routes
from llmesh.edge.filters import (
    access_logs,
    local_reply_config,
    lua_filter,
    router_filter,
    transcoder_config,
    transcoder_filter,
    typed,
)
from llmesh.edge.mtls import secure_edge_upstreams
from llmesh.edge.settings import CATALOG_CLUSTER, GRPC_SERVICE_OF, MODEL_SERVICE, SERVICE_NAMES, EdgeSettings
from llmesh.edge.tracing import collector_cluster, edge_tracing
from llmesh.edge.upstreams import grpc_upstream
from llmesh.edge.workers import (
    MAX_UPSTREAM_REQUESTS,
    WORKERS_CLUSTER,
    inference_paths,
    inference_routes,
    picker_filter,
    picker_off,
    workers_cluster,
)

LISTENER_NAME = "llmesh_edge"
# Native gRPC services every llmesh server also serves; through the edge they reach the registry
# (which serves ModelService's catalog too), so `grpcurl -plaintext EDGE list` and health probes
# of the edge work.
CONTROL_EXTRA_PREFIXES: tuple[str, ...] = ("/grpc.reflection.", "/grpc.health.v1.")
# Concurrent streams per upstream before Envoy answers 503 itself: LLM streams are long-lived,
# so Envoy's default of 1024 would cap a busy service.
MAX_DOWNSTREAM_CONNECTIONS = 50_000
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
# REST paths of the streaming RPCs (after the Lua filter's `"stream": true` rewrite): their
# transcoder prints only the fields that are set, as OpenAI's chunks carry them.
SSE_REST_PATHS: tuple[str, ...] = ("/v1/chat/completions:stream", "/v1/completions:stream")


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def public_rpcs(descriptor_path: Path | None = None) -> list[str]:
    """gRPC paths of the public RPCs: those with a google.api.http binding."""
    routes = http_routes(descriptor_path or default_descriptor_path())
    return sorted({route.grpc_path for route in routes})


def route_table(descriptor_path: Path | None = None) -> list[tuple[str, str]]:
    """(gRPC path or prefix, cluster) for every route, in match order. Exact paths for public RPCs
    only: internal RPCs (RegisterWorker, Acquire, Release, ...) have no route, so the public
    listener answers them 404 (gRPC UNIMPLEMENTED). Transcoded REST requests are matched again
    after transcoding, on their gRPC path, so these routes carry them too."""
    inference = set(inference_paths())
    cluster_of = {service: cluster for cluster, service in GRPC_SERVICE_OF.items()}
    cluster_of[MODEL_SERVICE] = CATALOG_CLUSTER
    table = [(path, WORKERS_CLUSTER) for path in inference_paths()]
    for path in public_rpcs(descriptor_path):
        if path not in inference:
            table.append((path, cluster_of[path.split("/")[1]]))
    table += [(prefix, CATALOG_CLUSTER) for prefix in CONTROL_EXTRA_PREFIXES]
    return table


def _control_route(match: str, cluster: str, settings: EdgeSettings) -> Route:
    is_prefix = match.endswith((".", "/"))
    per_filter = picker_off()
    if settings.auth_enabled and match in CONTROL_EXTRA_PREFIXES:
        from llmesh.auth.edge_contract import FILTER_NAME

        # Reflection is a bidirectional stream whose request body never ends while the client
        # waits for answers (grpcurl): AuthService checks it on its headers alone (it is a public
        # route) instead of waiting for a body to buffer, which would hang it until a timeout.
        per_filter[FILTER_NAME] = typed(
            ExtAuthzPerRoute(check_settings=CheckSettings(disable_request_body_buffering=True))
        )
    return Route(
        name=f"{cluster}:{match}",
        match=RouteMatch(prefix=match) if is_prefix else RouteMatch(path=match),
        route=RouteAction(
            cluster=cluster,
            # No overall timeout (watch-style streams); gRPC clients' deadlines still apply.
            timeout=timedelta(0),
            max_stream_duration=RouteActionMaxStreamDuration(grpc_timeout_header_max=timedelta(0)),
            # Only failures that provably never reached the service are retried.
            retry_policy=RetryPolicy(retry_on="connect-failure,refused-stream", num_retries=1),
        ),
        typed_per_filter_config=per_filter,
    )


def _sse_route(path: str, settings: EdgeSettings) -> Route:
    """The REST path of a streaming RPC, carrying the transcoder config that prints only set
    fields. After transcoding Envoy matches again on the gRPC path (an inference route)."""
    return Route(
        name=f"sse:{path}",
        match=RouteMatch(path=path),
        route=RouteAction(cluster=WORKERS_CLUSTER, timeout=timedelta(0)),
        typed_per_filter_config={
            TRANSCODER_FILTER: typed(transcoder_config(settings, print_unset_fields=False))
        },
    )


NO_ROUTE_MESSAGE = "not a public RPC of this API"


def _no_route() -> Route:
    """Everything else (internal RPCs, unknown paths): 404 (UNIMPLEMENTED for gRPC clients) from
    Envoy itself. Without this route the picker, on by default, would be asked about requests
    that match no route, and they would fail with 503 whenever the scheduler is away."""
    return Route(
        name="no-route",
        match=RouteMatch(prefix="/"),
        direct_response=DirectResponseAction(status=404, body=DataSource(inline_string=NO_ROUTE_MESSAGE)),
        typed_per_filter_config=picker_off(),
    )


def route_configuration(settings: EdgeSettings) -> RouteConfiguration:
    """One virtual host: streaming REST paths, inference RPCs (picker on), public control RPCs,
    then a 404 for everything else."""
    routes = [_sse_route(path, settings) for path in SSE_REST_PATHS]
    routes += inference_routes(settings)
    routes += [
        _control_route(match, cluster, settings)
        for match, cluster in route_table()
        if cluster != WORKERS_CLUSTER
    ]
    routes.append(_no_route())
    return RouteConfiguration(
        name="llmesh",
        virtual_hosts=[VirtualHost(name="llmesh", domains=["*"], routes=routes)],
    )


def auth_filter(settings: EdgeSettings) -> HttpFilter:
    """Envoy ext_authz to AuthService, as AuthService's edge contract describes it (fail closed,
    the whole body as bytes). After the transcoder: Check sees the gRPC path and message for REST
    and native gRPC alike; before the picker: nothing is leased for a refused request."""
    from llmesh.auth.edge_contract import FILTER_NAME, ext_authz_filter_config

    config = ext_authz_filter_config("auth", max_request_bytes=settings.max_request_bytes)
    config.pop("@type")
    return HttpFilter(name=FILTER_NAME, typed_config=typed(ExtAuthz.from_dict(config)))


def http_filters(settings: EdgeSettings) -> list[HttpFilter]:
    """Lua (stream routing, header hygiene), the transcoder, AuthService's check when auth is on,
    the endpoint picker, the router."""
    checks = [auth_filter(settings)] if settings.auth_enabled else []
    return [lua_filter(), transcoder_filter(settings), *checks, picker_filter(settings), router_filter()]


def connection_manager(settings: EdgeSettings) -> HttpConnectionManager:
    """HTTP/1.1 and HTTP/2 (gRPC) on one port, request ids, JSON errors and access logs."""
    return HttpConnectionManager(
        stat_prefix="llmesh_edge",
        codec_type=HttpConnectionManagerCodecType.AUTO,
        route_config=route_configuration(settings),
        http_filters=http_filters(settings),
        access_log=access_logs(settings),
        local_reply_config=local_reply_config(settings),
        # x-request-id: kept when the client sends one, generated otherwise, returned in the
        # response, and forwarded upstream as gRPC metadata the services log.
        generate_request_id=True,
        preserve_external_request_id=True,
        always_set_request_id_in_response=True,
        # By default Envoy rewrites one character of a UUID-shaped id to carry its tracing
        # decision, so the id a client sent would not be the id in the logs; without that
        # character the id cannot carry the decision, so traces are sampled at random (100 %).
        request_id_extension=RequestIdExtension(
            typed_config=typed(
                UuidRequestIdConfig(pack_trace_reason=False, use_request_id_for_trace_sampling=False)
            )
        ),
        use_remote_address=True,
        server_name="llmesh-edge",
        stream_idle_timeout=_seconds(settings.stream_idle_timeout_s),
        request_timeout=timedelta(0),
        request_headers_timeout=_seconds(30),
        common_http_protocol_options=HttpProtocolOptions(idle_timeout=_seconds(3600)),
        tracing=edge_tracing(settings) if settings.otlp_endpoint else None,
    )


def listener(settings: EdgeSettings) -> Listener:
    """The one public listener."""
    return Listener(
        name=LISTENER_NAME,
        address=Address(
            socket_address=SocketAddress(address=settings.listen_host, port_value=settings.listen_port)
        ),
        # Bodies are buffered (Lua, transcoder) up to this; beyond it the client gets 413.
        per_connection_buffer_limit_bytes=settings.max_request_bytes,
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=typed(connection_manager(settings)),
                    )
                ]
            )
        ],
    )


def health_check(settings: EdgeSettings, grpc_service: str) -> HealthCheck:
    """gRPC health checks of one control-plane service, frequent even without traffic so a host
    that comes up (or goes NOT_SERVING) is noticed within seconds, lenient enough that a busy one
    is not ejected."""
    interval = _seconds(settings.health_check_interval_s)
    return HealthCheck(
        timeout=_seconds(settings.health_check_timeout_s),
        interval=interval,
        no_traffic_interval=interval,
        unhealthy_interval=_seconds(min(settings.health_check_interval_s, 1.0)),
        interval_jitter=timedelta(milliseconds=100),
        unhealthy_threshold=settings.health_check_unhealthy_threshold,
        healthy_threshold=1,
        grpc_health_check=HealthCheckGrpcHealthCheck(service_name=grpc_service),
    )


def cluster(settings: EdgeSettings, service: str) -> Cluster:
    """An HTTP/2 cluster for a control-plane `service`: STATIC for an IP, STRICT_DNS for a name."""
    return grpc_upstream(
        service,
        settings.upstream(service),
        settings.connect_timeout_s,
        health_checks=[health_check(settings, GRPC_SERVICE_OF[service])],
        # Envoy's default (50%) would route to unhealthy hosts once most are down ("panic");
        # a NOT_SERVING service must get no traffic, so the client gets a clean 503 instead.
        common_lb_config=ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0.0)),
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    max_connections=MAX_UPSTREAM_REQUESTS,
                    max_pending_requests=MAX_UPSTREAM_REQUESTS,
                    max_requests=MAX_UPSTREAM_REQUESTS,
                )
            ]
        ),
        per_connection_buffer_limit_bytes=settings.max_request_bytes,
    )


def _overload_manager() -> OverloadManager:
    monitor = DownstreamConnectionsConfig(max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS)
    return OverloadManager(
        resource_monitors=[
            ResourceMonitor(
                name="envoy.resource_monitors.global_downstream_max_connections",
                typed_config=typed(monitor),
            )
        ]
    )


def bootstrap(settings: EdgeSettings) -> Bootstrap:
    """The typed bootstrap message."""
    clusters = [
        *(cluster(settings, name) for name in SERVICE_NAMES),
        workers_cluster(settings),
        *([collector_cluster(settings)] if settings.otlp_endpoint else []),
    ]
    if settings.upstream_tls_dir:
        secure_edge_upstreams(clusters, settings.upstream_tls_dir)
    return Bootstrap(
        node=Node(id=settings.node_id, cluster="llmesh"),
        admin=Admin(
            address=Address(
                socket_address=SocketAddress(address=settings.admin_host, port_value=settings.admin_port)
            )
        ),
        static_resources=BootstrapStaticResources(
            listeners=[listener(settings)],
            clusters=clusters,
        ),
        overload_manager=_overload_manager(),
    )


def render_bootstrap(settings: EdgeSettings) -> dict[str, Any]:
    """The bootstrap as plain data (proto JSON with snake_case keys), ready for YAML or JSON."""
    return bootstrap(settings).to_dict(casing=Casing.SNAKE)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the Lua script) as literal blocks, so the YAML stays readable."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)

_HEADER = (
    "# Envoy bootstrap of the llmesh edge, rendered by llmesh.edge (`llmesh envoy-config`).\n"
    "# Do not edit: change EdgeSettings or the generator and render again.\n"
)


def render_yaml(settings: EdgeSettings) -> str:
    """The bootstrap as YAML Envoy loads with `-c`."""
    return _HEADER + yaml.dump(render_bootstrap(settings), Dumper=_Dumper, sort_keys=False, width=100)


__all__ = [
    "LISTENER_NAME",
    "bootstrap",
    "cluster",
    "connection_manager",
    "listener",
    "render_bootstrap",
    "render_yaml",
    "route_configuration",
    "route_table",
]
