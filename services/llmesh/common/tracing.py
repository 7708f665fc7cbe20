"""OpenTelemetry traces: off unless configured, an OTLP exporter or the console, gRPC interceptors.

`setup_tracing` runs once per process (in `llmesh serve`) with `monitoring.otlp_endpoint` and
`monitoring.trace_console`; with neither set no tracer provider is installed, no interceptor is
added and a request pays nothing. When on, every gRPC server and `service_channel` client gets
opentelemetry-instrumentation-grpc's asyncio interceptors, so W3C `traceparent` flows through the
calls between services; each JSON log line written inside a span carries `trace_id` and `span_id`.

The instrumentation's streaming server wrapper records an exception only for `Exception`s: a
stream the client cancels (CancelledError, a BaseException) ends its span without an error status,
which is what a client going away should look like.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

log = logging.getLogger(__name__)

_enabled = False


def tracing_enabled() -> bool:
    """Whether this process exports spans (set by `setup_tracing`)."""
    return _enabled


class TraceIdsFilter(logging.Filter):
    """Adds `trace_id` and `span_id` (hex, as OTLP backends show them) to records logged inside a
    span, so the JSON formatter writes them."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


def setup_tracing(
    service: str, *, otlp_endpoint: str = "", console: bool = False, exporter: Any = None
) -> bool:
    """Install a tracer provider for `service` exporting to `otlp_endpoint` (gRPC OTLP, e.g.
    "http://collector:4317"), the console, or `exporter` (tests: an in-memory exporter, exported
    synchronously). Returns whether tracing is on."""
    global _enabled
    if not (otlp_endpoint or console or exporter is not None):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    current = trace.get_tracer_provider()
    # The global provider can be set once per process: add to it if this process already has one.
    provider = (
        current
        if isinstance(current, TracerProvider)
        else TracerProvider(resource=Resource.create({"service.name": service}))
    )
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if provider is not current:
        trace.set_tracer_provider(provider)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, TraceIdsFilter) for f in handler.filters):
            handler.addFilter(TraceIdsFilter())
    _enabled = True
    log.info("tracing on", extra={"otlp_endpoint": otlp_endpoint, "trace_console": console})
    return True


def disable_tracing() -> None:
    """Stop adding interceptors to servers and channels made from now on (tests; the global tracer
    provider itself cannot be replaced once set)."""
    global _enabled
    _enabled = False


def server_interceptors() -> list[Any]:
    """The OpenTelemetry server interceptor when tracing is on (probes and reflection excluded)."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.negate(filters.health_check()))]


def client_interceptors() -> list[Any]:
    """The OpenTelemetry client interceptors when tracing is on (they send `traceparent`)."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())
