"""The scheduler follows the registry through its absence and restarts."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.config import ModelConfig
from llmesh.registry.server import RegistryServiceConfig, start_registry
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.scheduler.server import SchedulerServiceConfig, start_scheduler
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_scheduler_waits_for_registry_and_survives_its_restart(tmp_path: Path) -> None:
    port = free_port()
    registry_config = RegistryServiceConfig(
        listen=f"127.0.0.1:{port}",
        database_url=f"sqlite:///{tmp_path}/llmesh.db",
        models=(ModelConfig(name="tiny-llama"),),
    )
    scheduler = await start_scheduler(
        SchedulerServiceConfig(listen="127.0.0.1:0", registry_address=f"127.0.0.1:{port}")
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
    stub = scheduler_grpc.SchedulerServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    request = scheduler_pb2.AcquireRequest(request_id="r1", model="tiny-llama", max_tokens=10)
    registries = []
    try:
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Acquire(request)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "has not received the worker list" in err.value.details()

        registries.append(await start_registry(registry_config))
        reg_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        registry = registry_grpc.RegistryServiceStub(reg_channel)
        await registry.RegisterWorker(
            registry_pb2.RegisterWorkerRequest(
                worker=registry_pb2.Worker(worker_id="w1", address="w1.local:7000", models=["tiny-llama"])
            )
        )

        async def acquired() -> scheduler_pb2.Lease:
            while True:
                try:
                    return (await stub.Acquire(request)).lease
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.02)

        lease = await asyncio.wait_for(acquired(), 2.0)
        assert lease.worker_id == "w1"
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == (
            health_pb2.HealthCheckResponse.SERVING
        )

        # Registry gone: the scheduler keeps routing to the workers it knew.
        await registries.pop().stop(None)
        await stub.Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id))
        assert (await stub.Acquire(scheduler_pb2.AcquireRequest(request_id="r2", model="tiny-llama"))).lease

        # The restarted registry serves its persisted membership: w1 never leaves the pool and
        # the lease r2 still holds on it is still counted.
        registries.append(await start_registry(registry_config))
        await asyncio.sleep(0.5)  # the watch reconnects and applies the new snapshot
        status = await stub.GetSchedulerStatus(scheduler_pb2.GetSchedulerStatusRequest())
        assert [(w.worker_id, w.active_leases, w.cordoned) for w in status.workers] == [("w1", 1, False)]
        await reg_channel.close(None)
    finally:
        await channel.close(None)
        await scheduler.stop(None)
        for running in registries:
            await running.stop(None)
