"""An in-process stack of real servers (registry, scheduler, auth, workers) on port 0 whose
workers run the ScriptedEngine test double — for tests about the platform, not about inference.
With `edge=True` a real Envoy stands in front (the token path: picker, EDS, workers). Workers may
also run real engines on models of their own (`worker_models`): the engines-through-Envoy tests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from llmesh.auth.server import AuthServiceConfig, start_auth
from llmesh.common.config import AuthConfig, ModelConfig
from llmesh.common.server import RunningServer
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.registry.server import RegistryServiceConfig, start_registry
from llmesh.scheduler.server import SchedulerServiceConfig, start_scheduler
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from llmesh.worker.engine import Engine
from llmesh.worker.scripted_engine import ScriptedEngine, ScriptedSettings
from llmesh.worker.server import WorkerServiceConfig, start_worker
from tests.scheduler.stack import until_status

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
    scheduler: sched_grpc.SchedulerServiceStub
    addresses: dict[str, str]  # the services an Envoy in front of the stack routes to
    engines: dict[str, Any]  # worker id -> its engine (ScriptedEngine unless worker_models says)
    worker_addresses: dict[str, str] = field(default_factory=dict)
    servers: list[RunningServer] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    envoy: Any = None  # llmesh.edge.EnvoyProcess when started with edge=True
    admin_key: str = ""  # the bootstrap admin's API key when started with auth=True
    # ModelService through Envoy (edge=True), else straight to the first worker.
    models: pb_grpc.ModelServiceStub | None = None

    def worker_models(self, worker_id: str) -> pb_grpc.ModelServiceStub:
        """ModelService on one worker, bypassing the edge."""
        channel = grpc.aio.insecure_channel(self.worker_addresses[worker_id])
        self.channels.append(channel)
        return pb_grpc.ModelServiceStub(channel)

    async def active_leases(self) -> int:
        status = await self.scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
        return sum(w.active_leases for w in status.workers)

    async def until_queued(self, count: int, model: str = MODEL.name, timeout_s: float = 10.0) -> None:
        """Until `count` requests for `model` wait in the picker's queue (a request sent is not yet
        queued: it passes Envoy and AuthService first, and a loaded host can take a while)."""
        await until_status(
            self.scheduler,
            lambda status: sum(q.waiting for q in status.queues if q.model == model) >= count,
            timeout_s,
            f"{count} request(s) never queued for {model}",
        )


async def _wait_for_workers(scheduler: sched_grpc.SchedulerServiceStub, count: int) -> None:
    await until_status(
        scheduler, lambda s: len(s.workers) >= count, 4.0, f"scheduler never saw {count} workers"
    )


async def make_stack(
    tmp_path: Path,
    engines: dict[str, ScriptedEngine] | dict[str, Engine],
    servers: list[RunningServer],
    *,
    worker_models: dict[str, ModelConfig] | None = None,
    max_queue_depth: int = 16,
    max_queue_wait: float = 5.0,
    edge: bool = False,
    auth: bool = False,
    otlp_endpoint: str = "",
) -> ScriptedStack:
    """Start registry, scheduler, workers and auth (and Envoy with `edge`); `servers` collects
    them for teardown. Each worker serves MODEL unless `worker_models` names its own model."""
    models = {w: (worker_models or {}).get(w, MODEL) for w in engines}
    catalog = tuple({m.name: m for m in (MODEL, *models.values())}.values())
    registry = await start_registry(
        RegistryServiceConfig(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path / 'registry.db'}",
            heartbeat_interval_seconds=1,
            heartbeat_ttl_seconds=5,
            models=catalog,
        )
    )
    servers.append(registry)
    registry_address = f"127.0.0.1:{registry.port}"
    booted: list[Any] = []
    auth_server = await start_auth(
        AuthServiceConfig(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path / 'auth.db'}",
            auth=AuthConfig(enabled=auth, admin_password="admin-password-1"),
        ),
        on_bootstrap=booted.append,
    )
    servers.append(auth_server)
    auth_address = f"127.0.0.1:{auth_server.port}"
    scheduler = await start_scheduler(
        SchedulerServiceConfig(
            listen="127.0.0.1:0",
            registry_address=registry_address,
            max_queue_depth=max_queue_depth,
            max_queue_wait_seconds=max_queue_wait,
            eject_seconds=30,
            auth_address=auth_address if auth else "",
        )
    )
    servers.append(scheduler)
    worker_addresses = {}
    for worker_id, engine in engines.items():
        worker = await start_worker(
            WorkerServiceConfig(
                listen="127.0.0.1:0",
                model=models[worker_id],
                worker_id=worker_id,
                registry_address=registry_address,
                scheduler_address=f"127.0.0.1:{scheduler.port}",
                heartbeat_interval_seconds=1,
            ),
            engine=engine,
        )
        servers.append(worker)
        worker_addresses[worker_id] = f"127.0.0.1:{worker.port}"
    scheduler_address = f"127.0.0.1:{scheduler.port}"
    sched_channel = grpc.aio.insecure_channel(scheduler_address)
    stack = ScriptedStack(
        scheduler=sched_grpc.SchedulerServiceStub(sched_channel),
        engines=dict(engines),
        worker_addresses=worker_addresses,
        addresses={
            "registry": registry_address,
            "scheduler": scheduler_address,
            "auth": auth_address,
        },
        servers=servers,
        channels=[sched_channel],
        admin_key=booted[0].api_key if booted else "",
    )
    await _wait_for_workers(stack.scheduler, len(engines))
    if edge:
        stack.envoy = await start_stack_edge(
            stack.addresses, tmp_path / "edge", max_queue_wait, auth, otlp_endpoint=otlp_endpoint
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.envoy.port}")
        stack.channels.append(channel)
        stack.models = pb_grpc.ModelServiceStub(channel)
        await wait_for_edge_workers(stack, len(engines))
    elif worker_addresses:
        stack.models = stack.worker_models(next(iter(worker_addresses)))
    return stack


async def start_stack_edge(
    addresses: dict[str, str],
    run_dir: Path,
    max_queue_wait: float,
    auth: bool = False,
    otlp_endpoint: str = "",
) -> Any:
    """A real Envoy in front of the stack (the edge config `llmesh up` uses), on free ports."""
    from llmesh.edge import EnvoyProcess
    from llmesh.edge.descriptor import default_descriptor_path
    from llmesh.edge.settings import EdgeSettings

    settings = EdgeSettings(
        listen_port=0,
        admin_port=0,
        registry=addresses["registry"],
        auth=addresses["auth"],
        scheduler=addresses["scheduler"],
        descriptor_path=str(default_descriptor_path()),
        access_log_path=str(run_dir / "access.log"),
        picker_timeout_s=max_queue_wait + 5,
        health_check_interval_s=0.5,
        auth_enabled=auth,
        otlp_endpoint=otlp_endpoint,
    )
    await asyncio.to_thread(run_dir.mkdir, parents=True, exist_ok=True)
    envoy = EnvoyProcess(settings, run_dir)
    await envoy.start()
    return envoy


async def wait_for_edge_workers(stack: ScriptedStack, count: int) -> None:
    """Until Envoy's workers cluster has `count` healthy hosts (EDS from the scheduler)."""
    import httpx

    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(200):
            text = (await client.get(f"http://127.0.0.1:{stack.envoy.admin_port}/clusters")).text
            healthy = [
                line
                for line in text.splitlines()
                if line.startswith("llmesh_workers::") and line.endswith("::health_flags::healthy")
            ]
            if len(healthy) >= count:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"Envoy never saw {count} healthy workers:\n{text}")


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
        if stack.envoy is not None:
            await stack.envoy.stop()
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


async def settled(stack: ScriptedStack, timeout_s: float = 10.0) -> None:
    """Until every lease is released. The picker releases when Envoy closes its ext_proc stream,
    which happens just after the client saw the response's end: poll, do not assume."""
    deadline = time.monotonic() + timeout_s
    while await stack.active_leases():
        assert time.monotonic() < deadline, "leases were not released"
        await asyncio.sleep(0.02)


async def access_log_lines(
    log_path: Path, *request_ids: str, timeout_s: float = 10.0
) -> dict[str, dict[str, Any]]:
    """The JSON access-log lines of Envoy (EdgeSettings.access_log_path) for `request_ids`, once
    every one is written: Envoy logs a request when it ends, just after the client saw the end."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = await asyncio.to_thread(log_path.read_text)
        except FileNotFoundError:
            text = ""
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        found = {e["request_id"]: e for e in entries if e.get("request_id") in request_ids}
        if len(found) == len(set(request_ids)):
            return found
        assert time.monotonic() < deadline, f"not in the access log: {set(request_ids) - set(found)}"
        await asyncio.sleep(0.02)
