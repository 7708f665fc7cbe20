"""Envoy's OpenTelemetry tracer: traces start at the edge and reach every service.

With a collector configured, the connection manager opens a span per request (sampled 100 %) and
exports it over OTLP/gRPC; the router passes W3C `traceparent` to the upstream (a worker or a
control-plane service), and ext_proc (the picker) and ext_authz (AuthService) calls carry it too,
so their server spans join the same trace. Without a collector nothing is traced.
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import GrpcService, GrpcServiceEnvoyGrpc
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManagerTracing,
)

from llmesh.edge.filters import typed
from llmesh.edge.settings import EdgeSettings, Endpoint
from llmesh.edge.upstreams import grpc_upstream

COLLECTOR_CLUSTER = "otlp_collector"
TRACER = "envoy.tracers.opentelemetry"
# The edge's name in traces (resource attribute service.name), beside llmesh-<service>.
EDGE_SERVICE_NAME = "llmesh-edge"


def collector_cluster(settings: EdgeSettings) -> Cluster:
    """An HTTP/2 cluster for the OTLP collector at `settings.otlp_endpoint`."""
    endpoint = Endpoint.parse(settings.otlp_endpoint, "otlp_endpoint")
    return grpc_upstream(COLLECTOR_CLUSTER, endpoint, settings.connect_timeout_s)


def edge_tracing(settings: EdgeSettings) -> HttpConnectionManagerTracing:
    """Every request traced and exported to the collector; upstream calls get their own spans."""
    tracer = OpenTelemetryConfig(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=COLLECTOR_CLUSTER)),
        service_name=EDGE_SERVICE_NAME,
    )
    return HttpConnectionManagerTracing(
        provider=TracingHttp(name=TRACER, typed_config=typed(tracer)),
        spawn_upstream_span=True,
    )
