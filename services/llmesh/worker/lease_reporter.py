"""Tells the scheduler what a cancelled stream produced, so the request is charged what it used.

A client that goes away cancels the worker's call; Envoy never forwards the worker's trailers, so
the picker cannot know the usage. The worker reports it with `Release(lease_id, CANCELLED, tokens)`
(the picker matches it to the stream's end; a lease already released stays released).
"""

from __future__ import annotations

import asyncio
import logging

from grpc import aio

from llmesh.common.channels import service_channel
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc

log = logging.getLogger(__name__)


class LeaseReporter:
    """Sends cancelled streams' usage to the scheduler, off the request's path."""

    def __init__(self, scheduler_address: str) -> None:
        self._channel = service_channel(scheduler_address, "scheduler")
        self._stub = sched_grpc.SchedulerServiceStub(self._channel)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def cancelled(self, lease_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        request = sched_pb.ReleaseRequest(
            lease_id=lease_id,
            outcome=sched_pb.OUTCOME_CANCELLED,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        if self._closed:
            # A stream cut by the end of the shutdown grace: the scheduler's own end of the lease
            # (Envoy's reset) still releases it, only without the usage.
            log.warning("usage of cancelled lease %s not reported: the worker is stopping", lease_id)
            return
        task = asyncio.get_running_loop().create_task(self._send(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, request: sched_pb.ReleaseRequest) -> None:
        for attempt in range(3):
            try:
                await self._stub.Release(request, timeout=5.0)
                return
            except aio.AioRpcError as error:
                if attempt == 2:
                    log.warning(
                        "usage of cancelled lease %s not reported: %s", request.lease_id, error.details()
                    )
                await asyncio.sleep(0.2 * (attempt + 1))

    async def close(self) -> None:
        self._closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        await self._channel.close(None)
