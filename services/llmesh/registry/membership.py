"""The worker side of membership: register, heartbeat with load, re-register, deregister.

A worker creates one `WorkerMembership`, awaits `start()` once its engine is ready, and awaits
`stop()` when it shuts down. Between the two, a background task heartbeats with the worker's load
and its own status (serving, draining, engine failed: `report_status`); when the registry answers
`known=false` (it lost the worker) the worker registers again.

Every failure is retried with backoff, forever: a registry that is restarting, a database that is
down (UNAVAILABLE), even an INTERNAL bug on the registry's side. Only an explicit refusal stops the
loop (an unknown model, a bad address, a worker id another live worker holds at another address,
a caller without permission): `refusal` then says why and `refused` is set, so the worker process
can exit instead of serving outside the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import grpc
from grpc import aio

from llmesh.common.channels import peer_channel
from llmesh.common.errors import Conflict, InvalidRequest
from llmesh.common.v1 import common_pb2
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc

log = logging.getLogger(__name__)

# Answers that are a decision about this worker, which retrying cannot change. Every other code
# (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, ...) is transient: retry.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class MembershipRefused(InvalidRequest):
    """The registry refused this worker (explicitly, not because something was down)."""


def _refusal(worker_id: str, e: aio.AioRpcError) -> MembershipRefused:
    error = MembershipRefused(f"the registry refused worker {worker_id!r}: {e.code().name}: {e.details()}")
    if e.code() == grpc.StatusCode.ALREADY_EXISTS:
        error.__cause__ = Conflict(e.details() or "")
    return error


def control_channel(address: str) -> aio.Channel:
    """A client channel to the registry for control-plane calls: llmesh keepalive and its short
    reconnect backoff, mTLS with mesh TLS on."""
    return peer_channel(address, "registry")


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
        on_refused: Callable[[MembershipRefused], None] | None = None,
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
        self._on_refused = on_refused
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._reported: int = worker.status or registry_pb2.WORKER_STATUS_READY
        self.status: int = registry_pb2.WORKER_STATUS_UNSPECIFIED
        """The status the registry last reported (DRAINING when an operator asked for a drain)."""
        self.registrations = 0
        """How many times the worker registered (more than 1 after the registry lost it)."""
        self.refused = asyncio.Event()
        """Set when the registry refused the worker; the loop has stopped (see `refusal`)."""
        self.refusal: MembershipRefused | None = None
        self.failed_heartbeats = 0
        """Heartbeats that failed (transient errors), in total."""

    @property
    def worker_id(self) -> str:
        """The worker's id."""
        return self._worker.worker_id

    async def start(self) -> None:
        """Register (retrying with backoff while the registry is unreachable), then heartbeat.

        Raises `MembershipRefused` (an InvalidRequest) when the registry refuses the worker
        (unknown model, bad address, id in use elsewhere): retrying would not help.
        """
        await self._register_until_accepted()
        self._task = asyncio.create_task(self._heartbeat_loop(), name=f"membership-{self.worker_id}")

    def report_status(self, status: int) -> None:
        """What the worker says about itself: READY (serving), DRAINING, or FAILED (engine died).

        Sent with the next heartbeat, which goes out now rather than at the next period.
        """
        if status != self._reported:
            self._reported = status
            self._worker.status = status  # type: ignore[assignment]
            self._wake.set()

    @property
    def reported_status(self) -> int:
        """The status this worker reports about itself."""
        return self._reported

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
        request.worker.status = self._reported  # type: ignore[assignment]
        request.worker.load.CopyFrom(self._load())
        response = await self._stub.RegisterWorker(request, timeout=self._rpc_timeout_s)
        period = self._interval_s or float(response.heartbeat_interval_seconds or 2)
        if response.lease_ttl_seconds:
            period = min(period, response.lease_ttl_seconds / 2)
        self._period_s = period
        self.status = registry_pb2.WORKER_STATUS_READY
        self.registrations += 1
        log.info("registered %s with the registry", self.worker_id, extra={"heartbeat_s": period})

    def _load(self) -> common_pb2.WorkerLoad:
        try:
            return self._load_fn()
        except Exception:
            # A broken load probe must not cost the worker its membership.
            log.exception("load of %s could not be read; heartbeating without it", self.worker_id)
            return common_pb2.WorkerLoad()

    async def _register_until_accepted(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._register_once()
                return
            except aio.AioRpcError as e:
                if e.code() in REFUSALS:
                    raise _refusal(self.worker_id, e) from None
                log.warning(
                    "registering %s failed (%s: %s); retrying in %.1fs",
                    self.worker_id,
                    e.code().name,
                    e.details(),
                    backoff,
                )
            except Exception:
                log.exception("registering %s failed; retrying in %.1fs", self.worker_id, backoff)
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self._max_backoff_s)

    def _jittered_period(self) -> float:
        # 80-100 % of the period: workers started together do not heartbeat in lockstep (bursts
        # of events for every watcher), and a heartbeat is never later than the period.
        return self._period_s * random.uniform(0.8, 1.0)

    async def _pause(self, seconds: float) -> None:
        """Sleep until the next heartbeat is due, or until `report_status` wants one now."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _heartbeat_loop(self) -> None:
        failing = False
        retry_s = 0.1
        delay = self._jittered_period()
        while True:
            await self._pause(delay)
            delay = self._jittered_period()
            try:
                response = await self._stub.Heartbeat(
                    registry_pb2.HeartbeatRequest(
                        worker_id=self.worker_id,
                        load=self._load(),
                        status=self._reported,  # type: ignore[arg-type]
                    ),
                    timeout=self._rpc_timeout_s,
                )
                if failing:
                    log.info("registry reachable again for %s", self.worker_id)
                    failing, retry_s = False, 0.1
                if response.known:
                    self.status = response.status
                else:
                    log.info("registry does not know %s (restarted?); registering again", self.worker_id)
                    await self._register_until_accepted()
            except MembershipRefused as refusal:
                log.error("%s; heartbeats stop", refusal.message)
                self.refusal = refusal
                self.refused.set()
                if self._on_refused is not None:
                    self._on_refused(refusal)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # Transient: retry sooner than the period (backing off up to it), so a worker is
                # back within moments of the registry or its database coming back.
                self.failed_heartbeats += 1
                if not failing:
                    code = e.code().name if isinstance(e, aio.AioRpcError) else type(e).__name__
                    log.warning("heartbeat of %s failed (%s); retrying with backoff", self.worker_id, code)
                    failing = True
                delay = min(retry_s * random.uniform(0.8, 1.2), self._period_s)
                retry_s = min(retry_s * 2, self._max_backoff_s)
