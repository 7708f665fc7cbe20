"""StartModelInstance/StopModelInstance driving `llmesh up`'s supervisor, with real processes: the
registry, scheduler, auth and Envoy are `llmesh serve` children of a `Stack`, the supervisor is the
one `llmesh up` serves, and the worker it starts is a real `llmesh serve worker` process.

The worker's engine is the `openai` adapter in front of a TEST DOUBLE upstream (GatedUpstream) that
holds its stream open until the test lets it finish, so "a stream in flight while its worker is
stopped" is a state the test controls, not a race against a timer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from google.protobuf import struct_pb2

from llmesh.cli.stack import Stack
from llmesh.cli.supervisor import SupervisorServer, serve_supervisor
from llmesh.common.config import load_config
from llmesh.model.v1 import model_service_pb2 as model_pb
from llmesh.model.v1 import model_service_pb2_grpc as model_grpc
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.worker.sse import encode_event
from tests.support import IN_CI, edge_worker_hosts, require
from tests.worker.http_double import DoubleRequest, HttpDouble, Reply

MODEL = "gated-model"
OTHER_MODEL = "catalog-only"


class GatedUpstream(HttpDouble):
    """TEST DOUBLE of an OpenAI-compatible server: each chat stream sends "first", then waits for
    `release` before sending " last", usage and [DONE]. `started` is set when a stream is open."""

    def __init__(self) -> None:
        super().__init__(self._handle)
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def _handle(self, req: DoubleRequest, reply: Reply) -> None:
        await reply.stream()
        await self._delta("first", None, reply)
        self.started.set()
        await self.release.wait()
        await self._delta(" last", "stop", reply)
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        await reply.write(encode_event({"object": "chat.completion.chunk", "choices": [], "usage": usage}))
        await reply.write(encode_event("[DONE]"))

    @staticmethod
    async def _delta(text: str, finish: str | None, reply: Reply) -> None:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        await reply.write(encode_event({"object": "chat.completion.chunk", "choices": [choice]}))


@dataclass
class SupervisedStack:
    stack: Stack
    supervisor: SupervisorServer
    registry: str
    edge: str
    edge_admin_port: int


def _write_config(path: Path, upstream_port: int) -> Path:
    data = {
        "logging": {"level": "INFO", "json": True},
        "server": {"host": "127.0.0.1", "drain_delay_seconds": 0, "shutdown_grace_seconds": 30},
        "registry": {"heartbeat_interval_seconds": 1, "heartbeat_ttl_seconds": 4},
        "scheduler": {"max_queue_wait_seconds": 2},
        "auth": {"enabled": False},
        "models": [
            {
                "name": MODEL,
                "aliases": ["gm"],
                "engine": "openai",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "upstream_model": "upstream",
                "max_model_len": 512,
                "max_output_tokens": 64,
            }
        ],
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
async def upstream() -> AsyncIterator[GatedUpstream]:
    double = await GatedUpstream().start()
    yield double
    double.release.set()
    await double.stop()


@pytest.fixture
def supervised(tmp_path: Path, upstream: GatedUpstream) -> Iterator[SupervisedStack]:
    """Registry, scheduler, auth and Envoy as processes, no workers, and the supervisor."""
    try:
        from llmesh.edge.supervise import start_envoy_child
        from llmesh.edge.validate import find_envoy

        find_envoy()
    except Exception as error:  # ImportError or EnvoyNotFound
        if IN_CI:
            raise
        require(False, f"Envoy is not available: {error}")
    config = _write_config(tmp_path / "llmesh.yaml", upstream.port)
    cfg = load_config(config, {"LLMESH_SERVER__ENVOY_PORT": "0", "LLMESH_SERVER__ENVOY_ADMIN_PORT": "0"})
    stack = Stack(tmp_path / "run", config)
    supervisor = serve_supervisor(stack, cfg)  # before the registry, which reads its address
    try:
        addresses = {}
        for kind in ("registry", "scheduler", "auth"):
            child = stack.start(kind, listen="127.0.0.1:0")
            addresses[kind] = f"127.0.0.1:{child.port}"
            stack.set_endpoint(kind, addresses[kind])
        edge = start_envoy_child(stack, cfg)
        yield SupervisedStack(
            stack=stack,
            supervisor=supervisor,
            registry=addresses["registry"],
            edge=edge,
            edge_admin_port=int(stack.child("envoy").info["admin_port"]),  # type: ignore[call-overload]
        )
    finally:
        stack.stop_all()


def _chat() -> model_pb.CreateChatCompletionRequest:
    return model_pb.CreateChatCompletionRequest(
        model="gm",
        messages=[model_pb.ChatMessage(role="user", content=struct_pb2.Value(string_value="Hello"))],
    )


async def _next_event(
    events: AsyncIterator[registry_pb2.WatchWorkersResponse], worker_id: str, kind: int, timeout_s: float
) -> registry_pb2.Worker:
    """The next watch event of `kind` for `worker_id` (others are skipped)."""

    async def find() -> registry_pb2.Worker:
        async for event in events:
            if event.type == kind and event.worker.worker_id == worker_id:
                return event.worker
        raise AssertionError("the watch ended")

    return await asyncio.wait_for(find(), timeout_s)


async def _edge_sees(s: SupervisedStack, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        hosts = await asyncio.to_thread(edge_worker_hosts, s.edge_admin_port)
        if sum(flags == "healthy" for flags in hosts.values()) == count:
            return
        assert time.monotonic() < deadline, f"Envoy's workers: {hosts}, wanted {count} healthy"
        await asyncio.sleep(0.1)


async def test_started_instance_serves_and_stopping_it_drains(
    supervised: SupervisedStack, upstream: GatedUpstream
) -> None:
    async with (
        grpc.aio.insecure_channel(supervised.registry) as reg_channel,
        grpc.aio.insecure_channel(supervised.edge) as edge_channel,
    ):
        registry = registry_grpc.RegistryServiceStub(reg_channel)
        models = model_grpc.ModelServiceStub(edge_channel)
        watch = registry.WatchWorkers(registry_pb2.WatchWorkersRequest())
        events = watch.__aiter__()
        first = await events.__anext__()
        assert first.type == registry_pb2.WORKER_EVENT_TYPE_SNAPSHOT_END  # no workers yet

        # Start, over REST through Envoy (an alias works): the supervisor launches a worker process.
        async with httpx.AsyncClient(base_url=f"http://{supervised.edge}", timeout=30) as http:
            reply = await http.post("/v1/registry/models/gm/instances", json={"labels": {"zone": "test"}})
        assert reply.status_code == 200, reply.text
        worker_id = reply.json()["worker_id"]
        assert worker_id == f"{MODEL}-1"
        added = await _next_event(events, worker_id, registry_pb2.WORKER_EVENT_TYPE_ADDED, 90)
        assert list(added.models) == [MODEL] and added.labels["zone"] == "test"
        await _edge_sees(supervised, 1)

        # It serves a request through Envoy (the only worker there is).
        stream = models.StreamChatCompletion(_chat())
        chunks = stream.__aiter__()
        first_chunk = await asyncio.wait_for(chunks.__anext__(), 30)
        assert first_chunk.choices[0].delta.content == "first"
        await asyncio.wait_for(upstream.started.wait(), 5)

        # Stop it while that stream is in flight: DRAINING at once, then it leaves the pool.
        async with httpx.AsyncClient(base_url=f"http://{supervised.edge}", timeout=30) as http:
            reply = await http.delete(f"/v1/registry/models/{MODEL}/instances/{worker_id}")
        assert reply.status_code == 200, reply.text
        assert reply.json()["worker"]["status"] == "WORKER_STATUS_DRAINING"
        await _next_event(events, worker_id, registry_pb2.WORKER_EVENT_TYPE_REMOVED, 15)
        await _edge_sees(supervised, 0)
        child = supervised.stack.child(worker_id)
        assert child.process.poll() is None, "the worker exited with its stream still running"

        # The stream still finishes, whole.
        upstream.release.set()
        rest = [chunk async for chunk in chunks]
        text = "".join(c.choices[0].delta.content for c in rest if c.choices)
        assert text == " last"
        assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == [
            "stop"
        ]
        # ... and then the process ends cleanly and leaves the stack.
        assert await asyncio.to_thread(child.process.wait, 40) == 0
        deadline = time.monotonic() + 5
        while worker_id in {c.name for c in supervised.stack.children}:
            assert time.monotonic() < deadline, "the stopped worker is still in the stack"
            await asyncio.sleep(0.05)
        assert supervised.stack.exited_children() == []  # llmesh up would not stop the stack for it
        listed = await registry.ListWorkers(registry_pb2.ListWorkersRequest())
        assert worker_id not in [w.worker_id for w in listed.workers]
        with pytest.raises(grpc.aio.AioRpcError) as err:  # no worker left for the model
            await models.CreateChatCompletion(_chat(), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        watch.cancel()


async def test_instance_errors_name_what_is_wrong(supervised: SupervisedStack) -> None:
    async with grpc.aio.insecure_channel(supervised.registry) as channel:
        registry = registry_grpc.RegistryServiceStub(channel)
        # A catalog model that llmesh up's config has no engine settings for.
        await registry.CreateModel(
            registry_pb2.CreateModelRequest(
                model=registry_pb2.Model(
                    name=OTHER_MODEL, engine=registry_pb2.EngineSettings(engine="openai")
                )
            )
        )
        cases = [
            (
                registry_pb2.StartModelInstanceRequest(model="no-such-model"),
                grpc.StatusCode.NOT_FOUND,
                "model: 'no-such-model' is not a live catalog model",
            ),
            (
                registry_pb2.StartModelInstanceRequest(model=OTHER_MODEL),
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {OTHER_MODEL!r} is in the catalog, but llmesh up's config",
            ),
            (
                registry_pb2.StartModelInstanceRequest(model=MODEL, labels={"bad key!": "x"}),
                grpc.StatusCode.INVALID_ARGUMENT,
                "labels: label key 'bad key!'",
            ),
            (
                registry_pb2.StopModelInstanceRequest(model=MODEL, worker_id="ghost"),
                grpc.StatusCode.NOT_FOUND,
                "worker 'ghost' is not a process this supervisor runs",
            ),
            (
                registry_pb2.StopModelInstanceRequest(model="no-such-model", worker_id="ghost"),
                grpc.StatusCode.NOT_FOUND,
                "model: 'no-such-model'",
            ),
        ]
        for request, code, needle in cases:
            call = (
                registry.StartModelInstance(request)
                if isinstance(request, registry_pb2.StartModelInstanceRequest)
                else registry.StopModelInstance(request)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == code, err.value.details()
            assert needle in (err.value.details() or "")

        # The supervisor gone (llmesh up stopping): UNAVAILABLE naming where it was.
        supervised.supervisor.stop()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await registry.StartModelInstance(registry_pb2.StartModelInstanceRequest(model=MODEL))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"worker supervisor at {supervised.supervisor.address}" in (err.value.details() or "")
