"""An in-process stack of real servers (registry, scheduler, gateway, workers) on port 0 whose
workers run the ScriptedEngine test double — for tests about the platform, not about inference."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from llmesh.auth.server import AuthServiceConfig, start_auth
from llmesh.common.config import ModelConfig
from llmesh.common.server import RunningServer
from llmesh.model.server import ModelServiceConfig, start_model_service
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.registry.server import RegistryServiceConfig, start_registry
from llmesh.scheduler.server import SchedulerServiceConfig, start_scheduler
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from llmesh.worker.scripted_engine import ScriptedEngine, ScriptedSettings
from llmesh.worker.server import WorkerServiceConfig, start_worker

MODEL = ModelConfig(
    name="scripted-model",
    engine="scripted",
    aliases=("sm",),
    max_model_len=512,
    max_output_tokens=64,
    max_num_seqs=2,
)


@dataclass
class ScriptedStack:
    gateway: pb_grpc.ModelServiceStub
    scheduler: sched_grpc.SchedulerServiceStub
    addresses: dict[str, str]  # the services an Envoy in front of the stack routes to
    engines: dict[str, ScriptedEngine]
    worker_addresses: dict[str, str] = field(default_factory=dict)
    servers: list[RunningServer] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def active_leases(self) -> int:
        status = await self.scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
        return sum(w.active_leases for w in status.workers)


async def _wait_for_workers(scheduler: sched_grpc.SchedulerServiceStub, count: int) -> None:
    for _ in range(200):
        status = await scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
        if len(status.workers) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"scheduler never saw {count} workers")


async def make_stack(
    tmp_path: Path,
    engines: dict[str, ScriptedEngine],
    servers: list[RunningServer],
    *,
    max_queue_depth: int = 16,
    max_queue_wait: float = 5.0,
) -> ScriptedStack:
    """Start registry, scheduler, workers and gateway; `servers` collects them for teardown."""
    registry = await start_registry(
        RegistryServiceConfig(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path / 'registry.db'}",
            heartbeat_interval_seconds=1,
            heartbeat_ttl_seconds=5,
            models=(MODEL,),
        )
    )
    servers.append(registry)
    registry_address = f"127.0.0.1:{registry.port}"
    scheduler = await start_scheduler(
        SchedulerServiceConfig(
            listen="127.0.0.1:0",
            registry_address=registry_address,
            max_queue_depth=max_queue_depth,
            max_queue_wait_seconds=max_queue_wait,
            eject_seconds=30,
        )
    )
    servers.append(scheduler)
    worker_addresses = {}
    for worker_id, engine in engines.items():
        worker = await start_worker(
            WorkerServiceConfig(
                listen="127.0.0.1:0",
                model=MODEL,
                worker_id=worker_id,
                registry_address=registry_address,
                heartbeat_interval_seconds=1,
            ),
            engine=engine,
        )
        servers.append(worker)
        worker_addresses[worker_id] = f"127.0.0.1:{worker.port}"
    scheduler_address = f"127.0.0.1:{scheduler.port}"
    auth = await start_auth(AuthServiceConfig(listen="127.0.0.1:0"))
    servers.append(auth)
    gateway = await start_model_service(
        ModelServiceConfig(
            listen="127.0.0.1:0", registry_address=registry_address, scheduler_address=scheduler_address
        )
    )
    servers.append(gateway)
    gw_channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    sched_channel = grpc.aio.insecure_channel(scheduler_address)
    stack = ScriptedStack(
        gateway=pb_grpc.ModelServiceStub(gw_channel),
        scheduler=sched_grpc.SchedulerServiceStub(sched_channel),
        engines=engines,
        worker_addresses=worker_addresses,
        addresses={
            "gateway": f"127.0.0.1:{gateway.port}",
            "registry": registry_address,
            "scheduler": scheduler_address,
            "auth": f"127.0.0.1:{auth.port}",
        },
        servers=servers,
        channels=[gw_channel, sched_channel],
    )
    await _wait_for_workers(stack.scheduler, len(engines))
    return stack


@pytest.fixture
async def stack_factory(tmp_path: Path) -> AsyncIterator:
    made: list[ScriptedStack] = []
    servers: list[RunningServer] = []

    async def factory(engines: dict[str, ScriptedEngine], **kwargs: object) -> ScriptedStack:
        stack = await make_stack(tmp_path, engines, servers, **kwargs)  # type: ignore[arg-type]
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        for channel in stack.channels:
            await channel.close()
    for server in reversed(servers):
        await server.stop(0)


def engine(**settings: object) -> ScriptedEngine:
    return ScriptedEngine(ScriptedSettings(model=MODEL.name, max_model_len=MODEL.max_model_len, **settings))  # type: ignore[arg-type]


def chat(content: str = "Hello", **fields: object) -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(
        model=MODEL.name,
        messages=[pb.ChatMessage(role="user", content=struct_pb2.Value(string_value=content))],
        **fields,  # type: ignore[arg-type]
    )
