"""The worker side of membership: register, heartbeat with load, re-register, deregister.

A worker creates one `WorkerMembership`, awaits `start()` once its engine is ready, and awaits
`stop()` when it shuts down. Between the two, a background task heartbeats; when the registry
answers `known=false` (it restarted and lost its in-memory membership) the worker registers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import grpc
from grpc import aio

from llmesh.common.channels import channel_options
from llmesh.common.errors import InvalidRequest
from llmesh.common.v1 import common_pb2
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc

log = logging.getLogger(__name__)

# Codes that mean "the registry is not there right now": keep trying. Anything else (a rejected
# registration, say) is a configuration problem that retrying cannot fix.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)

# Control-plane channels reconnect quickly after a peer restart (gRPC's default backoff grows to 120 s).
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def control_channel(address: str) -> aio.Channel:
    """A client channel for control-plane calls: llmesh keepalive plus a short reconnect backoff."""
    return aio.insecure_channel(address, options=[*channel_options(), *RECONNECT_OPTIONS])


class WorkerMembership:
    """Keeps one worker registered with the registry for as long as it runs.

    `channel_or_address` is a channel (not closed here) or "host:port" (a channel owned here).
    `interval_s` is the heartbeat period; None uses the registry's suggestion. The period is
    kept under half the registry's TTL so one lost heartbeat does not evict the worker.
    """

    def __init__(
        self,
        channel_or_address: aio.Channel | str,
        worker: registry_pb2.Worker,
        load_fn: Callable[[], common_pb2.WorkerLoad],
        interval_s: float | None = None,
        *,
        rpc_timeout_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        if isinstance(channel_or_address, str):
            self._channel = control_channel(channel_or_address)
            self._owns_channel = True
        else:
            self._channel = channel_or_address
            self._owns_channel = False
        self._stub = registry_grpc.RegistryServiceStub(self._channel)
        self._worker = registry_pb2.Worker()
        self._worker.CopyFrom(worker)
        self._load_fn = load_fn
        self._interval_s = interval_s
        self._rpc_timeout_s = rpc_timeout_s
        self._max_backoff_s = max_backoff_s
        self._period_s = interval_s or 2.0
        self._task: asyncio.Task[None] | None = None
        self.status: int = registry_pb2.WORKER_STATUS_UNSPECIFIED
        """The status the registry last reported (DRAINING when an operator asked for a drain)."""
        self.registrations = 0
        """How many times the worker registered (more than 1 after registry restarts)."""

    @property
    def worker_id(self) -> str:
        """The worker's id."""
        return self._worker.worker_id

    async def start(self) -> None:
        """Register (retrying with backoff while the registry is unreachable), then heartbeat.

        Raises `InvalidRequest` when the registry rejects the worker (unknown model, bad address):
        retrying would not help.
        """
        await self._register_until_accepted()
        self._task = asyncio.create_task(self._heartbeat_loop(), name=f"membership-{self.worker_id}")

    async def stop(self) -> None:
        """Stop heartbeating and deregister (best effort: a registry that is down evicts us anyway)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self._stub.DeregisterWorker(
                registry_pb2.DeregisterWorkerRequest(worker_id=self.worker_id),
                timeout=min(self._rpc_timeout_s, 2.0),
            )
        except aio.AioRpcError as e:
            log.info("deregistering %s failed (%s); its TTL will expire", self.worker_id, e.code().name)
        if self._owns_channel:
            await self._channel.close(None)

    async def _register_once(self) -> None:
        request = registry_pb2.RegisterWorkerRequest(worker=self._worker)
        request.worker.load.CopyFrom(self._load_fn())
        response = await self._stub.RegisterWorker(request, timeout=self._rpc_timeout_s)
        period = self._interval_s or float(response.heartbeat_interval_seconds or 2)
        if response.lease_ttl_seconds:
            period = min(period, response.lease_ttl_seconds / 2)
        self._period_s = period
        self.status = registry_pb2.WORKER_STATUS_READY
        self.registrations += 1
        log.info("registered %s with the registry", self.worker_id, extra={"heartbeat_s": period})

    async def _register_until_accepted(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._register_once()
                return
            except aio.AioRpcError as e:
                if e.code() not in RETRYABLE:
                    raise InvalidRequest(
                        f"the registry rejected worker {self.worker_id!r}: {e.code().name}: {e.details()}"
                    ) from None
                log.warning(
                    "registry unreachable while registering %s (%s); retrying in %.1fs",
                    self.worker_id,
                    e.code().name,
                    backoff,
                )
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self._max_backoff_s)

    async def _heartbeat_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._period_s)
            try:
                response = await self._stub.Heartbeat(
                    registry_pb2.HeartbeatRequest(worker_id=self.worker_id, load=self._load_fn()),
                    timeout=self._rpc_timeout_s,
                )
                if failing:
                    log.info("registry reachable again for %s", self.worker_id)
                    failing = False
                if response.known:
                    self.status = response.status
                else:
                    log.info("registry does not know %s (restarted?); registering again", self.worker_id)
                    await self._register_until_accepted()
            except aio.AioRpcError as e:
                # Log the first failure of a streak only; the heartbeat keeps its pace meanwhile.
                if not failing:
                    log.warning("heartbeat of %s failed: %s", self.worker_id, e.code().name)
                    failing = True
            except InvalidRequest:
                log.exception("registry rejected %s on re-registration; heartbeats stop", self.worker_id)
                return
