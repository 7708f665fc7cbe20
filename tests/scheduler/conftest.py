"""Fixtures for SchedulerService tests: a real registry and a real scheduler watching it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.config import ModelConfig
from llmesh.registry.server import RegistryServiceConfig, start_registry
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.scheduler.server import SchedulerServiceConfig, start_scheduler
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc
from tests.scheduler.stack import Stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """A registry (SQLite) with two catalog models and a scheduler fed by its watch."""
    registry = await start_registry(
        RegistryServiceConfig(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path}/llmesh.db",
            models=(ModelConfig(name="tiny-llama", aliases=("tiny",)), ModelConfig(name="other")),
        )
    )
    scheduler = await start_scheduler(
        SchedulerServiceConfig(
            listen="127.0.0.1:0",
            registry_address=f"127.0.0.1:{registry.port}",
            max_queue_wait_seconds=5.0,
            max_queue_depth=4,
            eject_seconds=0.3,
        )
    )
    registry_channel = grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}")
    scheduler_channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
    health = health_pb2_grpc.HealthStub(scheduler_channel)
    deadline = asyncio.get_running_loop().time() + 2
    while (
        await health.Check(health_pb2.HealthCheckRequest())
    ).status != health_pb2.HealthCheckResponse.SERVING:
        assert asyncio.get_running_loop().time() < deadline, "scheduler never became SERVING"
        await asyncio.sleep(0.01)
    yield Stack(
        registry_grpc.RegistryServiceStub(registry_channel),
        scheduler_grpc.SchedulerServiceStub(scheduler_channel),
        scheduler,
    )
    await scheduler_channel.close(None)
    await registry_channel.close(None)
    await scheduler.stop(None)
    await registry.stop(None)
