"""gRPC metrics for every llmesh server and client: requests by method and status, latency.

Names follow go-grpc-prometheus, which most gRPC dashboards already query:
`grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`, `grpc_server_handling_seconds`
and the `grpc_client_*` counterparts, labelled `grpc_type`, `grpc_service`, `grpc_method`.

A streaming RPC is counted when it ends, with its final status (OK, the status it aborted with,
CANCELLED when the client went away, UNKNOWN for an unhandled exception), and its latency is the
stream's whole life; on the client side too (the registry watch, any stream between services).
Nothing is done per streamed message: a server stream pays one generator hop, a client stream none.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from prometheus_client import Counter, Histogram

from llmesh.common.handlers import with_behavior
from llmesh.common.metrics import REGISTRY

_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# Control-plane RPCs take milliseconds; token streams take seconds to minutes.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)

SERVER_STARTED = Counter("grpc_server_started", "RPCs started on the server.", _LABELS, registry=REGISTRY)
SERVER_HANDLED = Counter(
    "grpc_server_handled",
    "RPCs completed on the server, by final status code (streams count when they end).",
    (*_LABELS, "grpc_code"),
    registry=REGISTRY,
)
SERVER_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start to its final status on the server (a stream's whole life).",
    _LABELS,
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
CLIENT_STARTED = Counter(
    "grpc_client_started", "RPCs this process started as a client.", _LABELS, registry=REGISTRY
)
CLIENT_HANDLED = Counter(
    "grpc_client_handled",
    "RPCs this process made as a client, by the status it got (streams count when they end).",
    (*_LABELS, "grpc_code"),
    registry=REGISTRY,
)
CLIENT_SECONDS = Histogram(
    "grpc_client_handling_seconds",
    "Time from a client RPC's start to its status (a stream's whole life).",
    _LABELS,
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)

# Not worth a label set of their own: probes and reflection would drown the real RPCs.
_SKIPPED = ("/grpc.health.", "/grpc.reflection.")


def split_method(full: str) -> tuple[str, str]:
    """ "/pkg.Service/Method" -> ("pkg.Service", "Method")."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method


class _MethodMetrics:
    """The labelled children of one method, bound once: no label lookups while serving."""

    __slots__ = ("_by_code", "_handled", "_labels", "seconds", "started")

    def __init__(self, kind: str, full_method: str, server: bool) -> None:
        self._labels = (kind, *split_method(full_method))
        started, self._handled, seconds = (
            (SERVER_STARTED, SERVER_HANDLED, SERVER_SECONDS)
            if server
            else (CLIENT_STARTED, CLIENT_HANDLED, CLIENT_SECONDS)
        )
        self.started = started.labels(*self._labels)
        self.seconds = seconds.labels(*self._labels)
        self._by_code: dict[grpc.StatusCode, Any] = {}

    def done(self, code: grpc.StatusCode, seconds: float) -> None:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._handled.labels(*self._labels, code.name)
        child.inc()
        self.seconds.observe(seconds)


def _final_code(context: aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the RPC ends with, given how its handler returned."""
    if error is None or isinstance(error, aio.AbortError):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        if isinstance(code, int):  # some grpcio versions keep the raw number
            return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Timed:
    """Counts one RPC as started on entry, and on exit as handled with the status its ending
    implies (whatever exception, BaseExceptions included, ended it)."""

    __slots__ = ("_began", "_context", "_metrics")

    def __init__(self, metrics: _MethodMetrics, context: aio.ServicerContext) -> None:
        self._metrics, self._context = metrics, context
        self._began = time.perf_counter()
        metrics.started.inc()

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: object, error: BaseException | None, _tb: object) -> None:
        self._metrics.done(_final_code(self._context, error), time.perf_counter() - self._began)


def _wrap_response(behavior: Callable[..., Awaitable[Any]], metrics: _MethodMetrics) -> Callable[..., Any]:
    """A handler that returns one response (unary-unary, stream-unary)."""

    async def handler(request: Any, context: aio.ServicerContext) -> Any:
        with _Timed(metrics, context):
            return await behavior(request, context)

    return handler


def _wrap_stream(behavior: Callable[..., Any], metrics: _MethodMetrics) -> Callable[..., Any]:
    """A handler that streams responses (unary-stream, stream-stream), as an async generator."""

    async def handler(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        with _Timed(metrics, context):
            async for item in behavior(request, context):
                yield item

    return handler


# (handler attribute, grpc_type label, wrapper) per RPC shape.
_SHAPES: tuple[tuple[str, str, Callable[..., Any]], ...] = (
    ("unary_unary", "unary", _wrap_response),
    ("unary_stream", "server_stream", _wrap_stream),
    ("stream_unary", "client_stream", _wrap_response),
    ("stream_stream", "bidi_stream", _wrap_stream),
)


class ServerMetricsInterceptor(aio.ServerInterceptor):
    """Counts every RPC by method and final status and times it; install it outermost, so the
    status it sees is the one the error-mapping interceptor settled on."""

    def __init__(self) -> None:
        self._methods: dict[str, _MethodMetrics] = {}

    def _metrics(self, kind: str, method: str) -> _MethodMetrics:
        found = self._methods.get(method)
        if found is None:
            found = self._methods[method] = _MethodMetrics(kind, method, server=True)
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_SKIPPED):
            return handler
        for attr, kind, wrap in _SHAPES:
            behavior = getattr(handler, attr)
            if behavior is None:
                continue
            if wrap is _wrap_stream and not inspect.isasyncgenfunction(behavior):
                break  # a streaming handler written with context.write (no generator): left as it is
            return with_behavior(handler, attr, wrap(behavior, self._metrics(kind, method)))
        return handler


class _ClientCalls:
    """Counts the calls of one channel, whatever their shape: started when made, handled with
    their final status when they end (a done callback, which every grpc.aio call has). The call
    continuation made is handed back as it is, not wrapped in a generator, so callers read
    (`async for`, `read()`), write and cancel as on any call, and no message pays a hop."""

    def __init__(self) -> None:
        self._methods: dict[str, _MethodMetrics] = {}
        self._pending: set[asyncio.Future[None]] = set()

    async def count(
        self, kind: str, continuation: Callable[..., Any], details: aio.ClientCallDetails, request: Any
    ) -> Any:
        raw = details.method
        method = raw.decode() if isinstance(raw, bytes) else str(raw)
        m = self._methods.get(method)
        if m is None:
            m = self._methods[method] = _MethodMetrics(kind, method, server=False)
        m.started.inc()
        began = time.perf_counter()
        call = await continuation(details, request)

        def record(done: aio.Call) -> None:
            # The call is over; code() is a coroutine that returns at once. Held until it ran, as
            # the event loop keeps only weak references to tasks.
            task = asyncio.ensure_future(_record_client(done, m, time.perf_counter() - began))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        call.add_done_callback(record)
        return call


# grpc.aio files an interceptor under one call shape only: one class per shape, all counting into
# the channel's `_ClientCalls`. (grpc-stubs type the continuations as synchronous; grpc.aio awaits
# them, and its stream-unary hook's return type is wrong there: hence `Any`.)


class ClientMetricsInterceptor(aio.UnaryUnaryClientInterceptor):
    """Counts and times the unary RPCs a channel makes (the control-plane calls between services)."""

    def __init__(self, calls: _ClientCalls | None = None) -> None:
        self._calls = calls or _ClientCalls()

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._calls.count("unary", continuation, client_call_details, request)


class _ClientStreamMetrics(aio.UnaryStreamClientInterceptor):
    """Server-streaming calls (the registry watch), counted when they end (CANCELLED when the
    caller cancelled); their latency is the stream's whole life."""

    def __init__(self, calls: _ClientCalls) -> None:
        self._calls = calls

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._calls.count("server_stream", continuation, client_call_details, request)


class _ClientBidiMetrics(aio.StreamStreamClientInterceptor):
    """Bidirectional streams, counted as `_ClientStreamMetrics` counts."""

    def __init__(self, calls: _ClientCalls) -> None:
        self._calls = calls

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await self._calls.count("bidi_stream", continuation, client_call_details, requests)


class _ClientUploadMetrics(aio.StreamUnaryClientInterceptor):
    """Client-streaming calls, counted as `_ClientStreamMetrics` counts."""

    def __init__(self, calls: _ClientCalls) -> None:
        self._calls = calls

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await self._calls.count("client_stream", continuation, client_call_details, requests)


def client_metrics_interceptors() -> list[Any]:
    """One channel's client interceptors counting every call by method and final status."""
    calls = _ClientCalls()
    return [
        ClientMetricsInterceptor(calls),
        _ClientStreamMetrics(calls),
        _ClientBidiMetrics(calls),
        _ClientUploadMetrics(calls),
    ]


async def _record_client(call: aio.Call, metrics: _MethodMetrics, seconds: float) -> None:
    metrics.done(await call.code(), seconds)
