"""A registry plus a scheduler fed by its watch, as the scheduler tests drive them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from llmesh.common.server import RunningServer
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc


@dataclass
class Stack:
    """A registry, a scheduler fed by it, and stubs for both."""

    registry: registry_grpc.RegistryServiceStub
    scheduler: scheduler_grpc.SchedulerServiceStub
    scheduler_server: RunningServer

    async def add_worker(
        self, worker_id: str, capacity: int = 2, models: tuple[str, ...] = ("tiny",)
    ) -> None:
        """Register a worker (a registration only: no engine behind it) and wait until it is routable."""
        await self.registry.RegisterWorker(
            registry_pb2.RegisterWorkerRequest(
                worker=registry_pb2.Worker(
                    worker_id=worker_id,
                    address=f"{worker_id}.local:7000",
                    models=list(models),
                    capacity=capacity,
                )
            )
        )
        await self.until(lambda s: any(w.worker_id == worker_id for w in s.workers))

    async def until(
        self,
        predicate: Callable[[scheduler_pb2.GetSchedulerStatusResponse], object],
        timeout: float = 2.0,
    ) -> scheduler_pb2.GetSchedulerStatusResponse:
        """Poll the scheduler's status until `predicate(status)` holds."""
        return await until_status(self.scheduler, predicate, timeout)


async def until_status(
    scheduler: scheduler_grpc.SchedulerServiceStub,
    predicate: Callable[[scheduler_pb2.GetSchedulerStatusResponse], object],
    timeout: float,
    what: str = "scheduler never got there",
) -> scheduler_pb2.GetSchedulerStatusResponse:
    """Poll `scheduler`'s status until `predicate(status)` holds; fail with `what` after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = await scheduler.GetSchedulerStatus(scheduler_pb2.GetSchedulerStatusRequest())
        if predicate(status):
            return status
        assert asyncio.get_running_loop().time() < deadline, f"{what}: {status}"
        await asyncio.sleep(0.02)
