"""An HTTP/2 (gRPC) cluster for one "host:port": what every fixed upstream of the edge shares (the
control-plane services, the OTLP collector). STATIC for an IP literal, STRICT_DNS for a name."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType, ClusterDnsLookupFamily
from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.endpoint.v3 import Endpoint as EnvoyEndpoint

from llmesh.edge.filters import typed
from llmesh.edge.settings import Endpoint
from llmesh.edge.workers import UPSTREAM_OPTIONS_KEY, http2_upstream_options


def grpc_upstream(name: str, endpoint: Endpoint, connect_timeout_s: float, **fields: Any) -> Cluster:
    """Cluster `name` with the one host `endpoint`, spoken to over HTTP/2; `fields` add the rest
    (health checks, circuit breakers...)."""
    discovery: dict[str, Any] = (
        {"type": ClusterDiscoveryType.STATIC}
        if endpoint.is_ip
        else {
            "type": ClusterDiscoveryType.STRICT_DNS,
            "dns_lookup_family": ClusterDnsLookupFamily.V4_PREFERRED,
        }
    )
    address = Address(socket_address=SocketAddress(address=endpoint.dial_host, port_value=endpoint.port))
    return Cluster(
        name=name,
        connect_timeout=timedelta(seconds=connect_timeout_s),
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=EnvoyEndpoint(address=address))])
            ],
        ),
        typed_extension_protocol_options={UPSTREAM_OPTIONS_KEY: typed(http2_upstream_options())},
        **discovery,
        **fields,
    )
