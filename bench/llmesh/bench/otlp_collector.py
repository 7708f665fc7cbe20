"""A real OTLP/gRPC trace receiver in-process: what the telemetry bench exports spans to, and what
the tracing tests check traces against. It keeps (trace id, service.name, span name) per span and
answers every Export at once, as a collector with free capacity would."""

from __future__ import annotations

from collections import Counter

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """Spans received, as (trace id hex, service.name, span name)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append((span.trace_id.hex(), attributes.get("service.name", ""), span.name))
        return trace_service_pb2.ExportTraceServiceResponse()

    def by_service(self) -> dict[str, int]:
        """Spans received per service.name."""
        return dict(sorted(Counter(service for _, service, _ in self.spans).items()))


async def start_collector(host: str = "127.0.0.1") -> tuple[OtlpCollector, grpc.aio.Server, str]:
    """A collector on a free port of `host`: (collector, its server to stop, "host:port")."""
    collector = OtlpCollector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return collector, server, f"{host}:{port}"
