"""Lease a worker, stream from it directly, release the lease: the gateway's core loop.

A worker that fails before its first token is released as failed and another is leased
(bounded attempts, failed workers excluded). After the first token a failure reaches the caller.
The lease is released on every path — success, error and cancellation — exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc import aio

from llmesh.common.channels import insecure_channel
from llmesh.common.errors import (
    DeadlineExceeded,
    DependencyDown,
    InvalidRequest,
    LlmeshError,
    NotFound,
    OverCapacity,
)
from llmesh.common.interceptors import REQUEST_ID_HEADER, RETRY_AFTER_HEADER
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from llmesh.worker.v1 import worker_service_pb2 as worker_pb
from llmesh.worker.v1 import worker_service_pb2_grpc as worker_grpc

log = logging.getLogger(__name__)

# Worker statuses that mean "this request is wrong", not "this worker is broken".
_CALLER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
}
_RELEASE_TIMEOUT_S = 5.0

T = TypeVar("T")


class WorkerChannels:
    """One long-lived channel per worker address, created on first use."""

    def __init__(self) -> None:
        self._stubs: dict[str, worker_grpc.WorkerServiceStub] = {}
        self._channels: dict[str, aio.Channel] = {}

    def stub(self, address: str) -> worker_grpc.WorkerServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = insecure_channel(address)
            self._channels[address] = channel
            stub = self._stubs[address] = worker_grpc.WorkerServiceStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
        self._stubs.clear()


@dataclass
class StreamStats:
    """What a dispatched stream produced, for usage accounting after it ends."""

    worker_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    outcome: str = "success"
    excluded: list[str] = field(default_factory=list)


def _retry_after(error: aio.AioRpcError) -> float | None:
    pairs: list[tuple[str, str | bytes]] = list(error.trailing_metadata() or ())  # type: ignore[arg-type]
    for key, value in pairs:
        if key == RETRY_AFTER_HEADER:
            with contextlib.suppress(ValueError):
                return int(value) / 1000
    return None


def scheduler_error(error: aio.AioRpcError) -> LlmeshError:
    """A scheduler refusal, as the domain error the caller should see."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OverCapacity(details, retry_after_s=_retry_after(error))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("no worker became free before the request's deadline; retry later")
    if code in _CALLER_ERRORS:
        return _CALLER_ERRORS[code](details)
    if code == grpc.StatusCode.UNAVAILABLE and details and "scheduler" not in details.lower():
        return DependencyDown(details)
    return DependencyDown(f"the scheduler is unavailable ({code.name}: {details}); retry shortly")


class Dispatcher:
    """Runs one generation on a leased worker and streams its messages back."""

    def __init__(
        self, scheduler: sched_grpc.SchedulerServiceStub, workers: WorkerChannels, max_attempts: int = 3
    ) -> None:
        self._scheduler = scheduler
        self._workers = workers
        self._max_attempts = max(1, max_attempts)

    async def _acquire(self, demand: sched_pb.AcquireRequest, timeout: float | None) -> sched_pb.Lease:
        try:
            response = await self._scheduler.Acquire(demand, timeout=timeout)
        except aio.AioRpcError as error:
            raise scheduler_error(error) from None
        return response.lease

    async def _release(self, lease: sched_pb.Lease, outcome: int, stats: StreamStats, error: str) -> None:
        request = sched_pb.ReleaseRequest(
            lease_id=lease.lease_id,
            outcome=outcome,  # type: ignore[arg-type]
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            error=error[:500],
        )
        try:
            # Shielded: a cancelled client must still give its lease back.
            await asyncio.shield(self._scheduler.Release(request, timeout=_RELEASE_TIMEOUT_S))
        except (aio.AioRpcError, asyncio.CancelledError) as e:
            log.warning("lease release failed", extra={"lease_id": lease.lease_id, "error": str(e)})

    async def stream(
        self,
        generate: worker_pb.GenerateRequest,
        demand: sched_pb.AcquireRequest,
        stats: StreamStats,
        timeout: float | None,
    ) -> AsyncIterator[worker_pb.GenerateResponse]:
        """Yield the worker's messages; `stats` holds usage and outcome when the stream ends."""
        metadata = ((REQUEST_ID_HEADER, generate.request_id),)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            stats.attempts += 1
            remaining = None if deadline is None else max(0.001, deadline - loop.time())
            demand.exclude_workers[:] = stats.excluded
            lease = await self._acquire(demand, remaining)
            stats.worker_id = lease.worker_id
            outcome, error_text, started = sched_pb.OUTCOME_WORKER_FAILED, "", False
            call = self._workers.stub(lease.worker_address).Generate(
                generate,
                timeout=None if deadline is None else max(0.001, deadline - loop.time()),
                metadata=metadata,
            )
            try:
                async for message in call:
                    started = True
                    if message.prompt_tokens:
                        stats.prompt_tokens = message.prompt_tokens
                    stats.completion_tokens += sum(len(c.token_ids) for c in message.choices)
                    if message.HasField("usage"):
                        stats.prompt_tokens = message.usage.prompt_tokens
                        stats.completion_tokens = message.usage.completion_tokens
                    yield message
                outcome = sched_pb.OUTCOME_SUCCESS
                return
            except aio.AioRpcError as error:
                error_text = f"{error.code().name}: {error.details()}"
                caller_error = _CALLER_ERRORS.get(error.code())
                if caller_error is not None:
                    outcome, stats.outcome = sched_pb.OUTCOME_REJECTED, "rejected"
                    raise caller_error(error.details() or "invalid request") from None
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    outcome, stats.outcome = sched_pb.OUTCOME_CANCELLED, "cancelled"
                    raise DeadlineExceeded("the request's deadline passed while generating") from None
                stats.outcome = "error"
                if started or stats.attempts >= self._max_attempts:
                    where = "mid-stream" if started else f"after {stats.attempts} attempts"
                    raise DependencyDown(
                        f"worker {lease.worker_id} failed {where} ({error_text}); retry the request"
                    ) from None
                log.warning(
                    "worker failed before the first token; trying another",
                    extra={"worker_id": lease.worker_id, "error": error_text},
                )
                stats.excluded.append(lease.worker_id)
            except (asyncio.CancelledError, GeneratorExit):
                outcome, stats.outcome = sched_pb.OUTCOME_CANCELLED, "cancelled"
                raise
            finally:
                if not call.done():
                    call.cancel()  # propagates the client's cancel to the worker → engine abort
                await self._release(lease, outcome, stats, error_text)

    async def call_worker(
        self,
        demand: sched_pb.AcquireRequest,
        call: Callable[[worker_grpc.WorkerServiceStub], Awaitable[T]],
        timeout: float | None,
    ) -> T:
        """Run one unary worker call (tokenize, detokenize) under a short lease."""
        lease = await self._acquire(demand, timeout)
        stats, outcome, error_text = (
            StreamStats(worker_id=lease.worker_id),
            sched_pb.OUTCOME_WORKER_FAILED,
            "",
        )
        try:
            result = await call(self._workers.stub(lease.worker_address))
            outcome = sched_pb.OUTCOME_SUCCESS
            return result
        except aio.AioRpcError as error:
            error_text = f"{error.code().name}: {error.details()}"
            caller_error = _CALLER_ERRORS.get(error.code())
            if caller_error is not None:
                outcome = sched_pb.OUTCOME_REJECTED
                raise caller_error(error.details() or "invalid request") from None
            raise DependencyDown(
                f"worker {lease.worker_id} failed ({error_text}); retry the request"
            ) from None
        finally:
            await self._release(lease, outcome, stats, error_text)
