"""Envoy's side of the mesh's mTLS: TLS contexts from a `llmesh certs` directory, peers matched by
their SPIFFE URI SAN. Shared by the Kubernetes sidecars and edge (llmesh.edge.sidecar) and the
local edge of `llmesh up --tls` (`EdgeSettings.upstream_tls_dir`).
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import DataSource, TransportSocket, WatchedDirectory
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    DownstreamTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    TlsParameters,
    TlsParametersTlsProtocol,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher

from llmesh.common.tls import spiffe_id
from llmesh.edge.filters import typed
from llmesh.edge.tracing import COLLECTOR_CLUSTER
from llmesh.edge.workers import WORKERS_CLUSTER

TLS_SOCKET = "envoy.transport_sockets.tls"

# The edge's upstream clusters and the identity each must present.
EDGE_UPSTREAM_IDENTITY: dict[str, str] = {
    "registry": "registry",
    "auth": "auth",
    "scheduler": "scheduler",
    WORKERS_CLUSTER: "workers",
}
# Edge clusters outside the mesh, left as configured: the OTLP collector is not an llmesh service.
OUTSIDE_MESH: frozenset[str] = frozenset({COLLECTOR_CLUSTER})


def _file(tls_dir: str, name: str) -> DataSource:
    return DataSource(filename=f"{tls_dir}/{name}")


def common_tls(tls_dir: str, peers: tuple[str, ...]) -> CommonTlsContext:
    """Our certificate, the mesh CA, and the identities a peer may present (TLS 1.3 only, h2)."""
    return CommonTlsContext(
        # Both bounds: Envoy's clients default to a TLS 1.2 maximum, which with a 1.3 minimum
        # leaves no version at all (NO_SUPPORTED_VERSIONS_ENABLED on every upstream connection).
        tls_params=TlsParameters(
            tls_minimum_protocol_version=TlsParametersTlsProtocol.TLSv1_3,
            tls_maximum_protocol_version=TlsParametersTlsProtocol.TLSv1_3,
        ),
        tls_certificates=[
            TlsCertificate(
                certificate_chain=_file(tls_dir, "tls.crt"),
                private_key=_file(tls_dir, "tls.key"),
                # Secret volumes swap files atomically under this directory; Envoy reloads them.
                watched_directory=WatchedDirectory(path=tls_dir),
            )
        ],
        validation_context=CertificateValidationContext(
            trusted_ca=_file(tls_dir, "ca.crt"),
            watched_directory=WatchedDirectory(path=tls_dir),
            match_typed_subject_alt_names=[
                SubjectAltNameMatcher(
                    san_type=SubjectAltNameMatcherSanType.URI, matcher=StringMatcher(exact=spiffe_id(peer))
                )
                for peer in peers
            ],
        ),
        alpn_protocols=["h2"],
    )


def upstream_tls(tls_dir: str, identity: str) -> TransportSocket:
    """mTLS to a peer that must present `identity`."""
    context = UpstreamTlsContext(common_tls_context=common_tls(tls_dir, (identity,)), sni=identity)
    return TransportSocket(name=TLS_SOCKET, typed_config=typed(context))


def downstream_tls(tls_dir: str, clients: tuple[str, ...]) -> TransportSocket:
    """mTLS from peers: a client certificate is required and must name one of `clients`."""
    context = DownstreamTlsContext(
        common_tls_context=common_tls(tls_dir, clients), require_client_certificate=True
    )
    return TransportSocket(name=TLS_SOCKET, typed_config=typed(context))


def secure_edge_upstreams(clusters: Iterable[Cluster], tls_dir: str) -> None:
    """Give every mesh cluster of the edge mTLS with the edge's certificate from `tls_dir`; each
    peer must present the identity `EDGE_UPSTREAM_IDENTITY` names."""
    for cluster in clusters:
        if cluster.name in OUTSIDE_MESH:
            continue
        identity = EDGE_UPSTREAM_IDENTITY.get(cluster.name)
        if identity is None:
            raise ValueError(
                f"edge cluster {cluster.name!r} has no mesh identity; add it to EDGE_UPSTREAM_IDENTITY"
            )
        cluster.transport_socket = upstream_tls(tls_dir, identity)
