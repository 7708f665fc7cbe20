"""One bootstrap for every llmesh gRPC server: health, reflection, interceptors, shutdown.

Health is NOT_SERVING until the service says it is ready, and again while draining. Shutdown on
SIGTERM/SIGINT flips health to NOT_SERVING, runs the service's own clean-up (deregister, drain),
then stops the server with a grace period for in-flight RPCs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from llmesh.common.grpc_metrics import ServerMetricsInterceptor
from llmesh.common.interceptors import ErrorMappingInterceptor
from llmesh.common.tls import caller_check_interceptors, mesh_identity
from llmesh.common.tracing import server_interceptors

log = logging.getLogger(__name__)

# The empty service name stands for the server as a whole (what probes ask by default).
OVERALL = ""


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel arguments for servers: message limits that match the configured request limit."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class RunningServer:
    """A started server: its bound port, its health servicer and its clean-up hooks."""

    name: str
    server: aio.Server
    port: int
    health: HealthServicer
    service_names: tuple[str, ...]
    # Run before the server stops (deregister, refuse new work) and after it stopped
    # (release engines and connections that in-flight RPCs still needed during the grace period).
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    after_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Why the service cannot go on (set by `fail`); `serve_until_signal` then stops it and raises.
    failure: str = ""
    _failed: asyncio.Event = field(default_factory=asyncio.Event)
    _stopped: bool = False

    def fail(self, reason: str) -> None:
        """The service cannot go on (a worker's engine died): stop serving and exit non-zero."""
        self.failure = reason
        self._failed.set()

    async def set_serving(self, serving: bool) -> None:
        """Flip health for the server and each of its services."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (OVERALL, *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 5.0, drain_delay: float = 0.0) -> None:
        """Graceful stop, idempotent: health NOT_SERVING and the clean-up hooks (deregister), then
        `drain_delay` seconds in which load balancers notice while new requests are still served,
        then no new RPCs while in-flight ones get up to `grace` seconds, then the after-stop hooks."""
        if self._stopped:
            return
        self._stopped = True
        await self.set_serving(False)
        await self._run_hooks(self.on_shutdown)
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        await self.server.stop(grace)
        await self._run_hooks(self.after_stop)

    async def _run_hooks(self, hooks: list[Callable[[], Awaitable[None]]]) -> None:
        for hook in reversed(hooks):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook of %s failed", self.name)


async def start_server(
    name: str,
    listen: str,
    add_servicers: Callable[[aio.Server], Sequence[str]],
    *,
    max_message_bytes: int = 10 * 1024 * 1024,
    interceptors: Sequence[aio.ServerInterceptor] = (),
    reflect_also: Sequence[str] = (),
) -> RunningServer:
    """Start a server on `listen` ("host:port", port 0 picks a free one); health starts NOT_SERVING.

    `add_servicers` registers the service's servicers and returns their full service names.
    `reflect_also` names services that reflection describes besides them (the registry answers
    reflection for the whole public API at the edge; their modules must be imported).
    """
    server = aio.server(
        # Metrics outermost: they count the status the error mapping settled on.
        # Then the trace span (when tracing is on), so its status is the mapped one too.
        interceptors=[
            ServerMetricsInterceptor(),
            *server_interceptors(),
            ErrorMappingInterceptor(),
            # With mesh TLS: only the identities allowed to call this service get further.
            *caller_check_interceptors(name),
            *interceptors,
        ],
        options=server_options(max_message_bytes),
    )
    service_names = tuple(add_servicers(server))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *service_names,
            *reflect_also,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    identity = mesh_identity()
    try:
        if identity is None:
            port = server.add_insecure_port(listen)
        else:
            # mTLS (`llmesh up --tls`): only callers with a mesh certificate get in.
            port = server.add_secure_port(listen, identity.server_credentials())
    except RuntimeError:  # grpcio reports bind failures this way
        port = 0
    if port == 0:
        raise OSError(
            f"{name}: cannot listen on {listen}: address in use or not available; pick another port"
        )
    await server.start()
    running = RunningServer(name=name, server=server, port=port, health=health, service_names=service_names)
    await running.set_serving(False)
    log.info("%s listening", name, extra={"port": port, "listen": listen, "mtls": identity is not None})
    return running


def write_ready_file(path: Path | None, **info: object) -> None:
    """Tell a supervising process (llmesh up, tests) where we listen: written atomically."""
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def stop_on_signal() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT; the handlers are in place when this returns."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


class ServiceFailed(RuntimeError):
    """A service stopped because it cannot go on (`RunningServer.fail`); its process exits non-zero
    so a supervisor (Kubernetes, `llmesh up`'s user) sees it and restarts it."""


def freeze_startup_heap() -> None:
    """Keep what start-up built (imported modules, descriptor pools, the engine's state) out of the
    garbage collector's walks: collect once, then freeze the survivors, as vLLM's own API server
    does after start-up. Without it the worker spent ~7 % of its CPU in the collector at 64
    streams (py-spy --native), walking objects that live as long as the process."""
    gc.collect()
    gc.freeze()


async def serve_until_signal(running: RunningServer, grace: float, drain_delay: float = 0.0) -> None:
    """Block until SIGTERM/SIGINT, then shut down gracefully (see `RunningServer.stop`); raise
    ServiceFailed after stopping at once if the service fails first. A service process calls it
    once it has started, so its start-up heap is frozen here (`freeze_startup_heap`) — after the
    signal handlers are in place: a supervisor may stop the service the moment it is ready."""
    stop = stop_on_signal()
    freeze_startup_heap()
    signalled = asyncio.ensure_future(stop.wait())
    failed = asyncio.ensure_future(running._failed.wait())
    await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    for waiter in (signalled, failed):
        waiter.cancel()
    if running.failure:
        log.error("%s failed: %s; stopping", running.name, running.failure)
        await running.stop(0)
        raise ServiceFailed(f"{running.name}: {running.failure}")
    log.info("%s shutting down", running.name, extra={"grace_s": grace, "drain_delay_s": drain_delay})
    await running.stop(grace, drain_delay)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an async main with uvloop where installed."""
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


__all__ = [
    "RunningServer",
    "ServiceFailed",
    "grpc",
    "run",
    "serve_until_signal",
    "start_server",
    "stop_on_signal",
    "write_ready_file",
]
