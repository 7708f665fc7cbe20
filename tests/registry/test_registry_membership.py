"""WorkerMembership (the worker-side client) and WatchWorkers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import grpc
import pytest

from llmesh.common.errors import DependencyDown, InvalidRequest
from llmesh.common.v1 import common_pb2
from llmesh.registry import workers as workers_module
from llmesh.registry.membership import WorkerMembership
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

EventType = registry_pb2.WorkerEventType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(predicate: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def worker(worker_id: str = "w1", models: tuple[str, ...] = ("tiny",)) -> registry_pb2.Worker:
    return registry_pb2.Worker(worker_id=worker_id, address="127.0.0.1:7001", models=list(models))


def load() -> common_pb2.WorkerLoad:
    return common_pb2.WorkerLoad(running_requests=1)


async def test_membership_waits_for_registry_and_rejoins_after_restart(make_registry: Any) -> None:
    port = free_port()
    membership = WorkerMembership(f"127.0.0.1:{port}", worker(), load, interval_s=0.1)
    starting = asyncio.create_task(membership.start())
    await asyncio.sleep(0.3)
    assert not starting.done()  # the registry is not up yet: start() keeps retrying

    first, stub = await make_registry(listen=f"127.0.0.1:{port}")
    await asyncio.wait_for(starting, 2.0)
    assert membership.registrations == 1

    await first.stop(None)
    _, stub = await make_registry(listen=f"127.0.0.1:{port}")  # same port and database
    # The restarted registry serves the persisted membership at once; heartbeats simply resume.
    listed = (await stub.ListWorkers(registry_pb2.ListWorkersRequest())).workers
    assert [w.worker_id for w in listed] == ["w1"]
    before = (
        (await stub.ListWorkers(registry_pb2.ListWorkersRequest())).workers[0].last_heartbeat.ToNanoseconds()
    )

    async def heartbeating() -> bool:
        workers = (await stub.ListWorkers(registry_pb2.ListWorkersRequest())).workers
        return bool(workers) and workers[0].last_heartbeat.ToNanoseconds() > before

    await eventually(heartbeating)
    assert membership.registrations == 1
    await stub.DrainWorker(registry_pb2.DrainWorkerRequest(worker_id="w1"))

    async def told_to_drain() -> bool:
        return membership.status == registry_pb2.WORKER_STATUS_DRAINING

    await eventually(told_to_drain)
    await membership.stop()
    assert not (await stub.ListWorkers(registry_pb2.ListWorkersRequest())).workers


async def test_membership_rejected_registration_raises(make_registry: Any) -> None:
    running, _ = await make_registry()
    membership = WorkerMembership(
        f"127.0.0.1:{running.port}", worker(models=("gpt-5",)), load, interval_s=0.1
    )
    with pytest.raises(InvalidRequest, match=r"refused worker 'w1': INVALID_ARGUMENT.*gpt-5"):
        await membership.start()
    await membership.stop()


async def test_watch_snapshot_then_changes(make_registry: Any) -> None:
    _, stub = await make_registry()
    await stub.RegisterWorker(registry_pb2.RegisterWorkerRequest(worker=worker("w1")))
    everything = stub.WatchWorkers(registry_pb2.WatchWorkersRequest())
    only_qwen = stub.WatchWorkers(registry_pb2.WatchWorkersRequest(model="qwen2"))

    async def next_event(stream: Any) -> tuple[int, str, int]:
        event = await asyncio.wait_for(stream.read(), 1.0)
        return event.type, event.worker.worker_id, event.worker.status

    assert await next_event(everything) == (EventType.WORKER_EVENT_TYPE_SNAPSHOT, "w1", 1)
    assert (await next_event(everything))[0] == EventType.WORKER_EVENT_TYPE_SNAPSHOT_END
    assert (await next_event(only_qwen))[0] == EventType.WORKER_EVENT_TYPE_SNAPSHOT_END

    await stub.RegisterWorker(registry_pb2.RegisterWorkerRequest(worker=worker("w2", ("qwen2", "tiny"))))
    assert await next_event(everything) == (EventType.WORKER_EVENT_TYPE_ADDED, "w2", 1)
    assert await next_event(only_qwen) == (EventType.WORKER_EVENT_TYPE_ADDED, "w2", 1)

    await stub.Heartbeat(registry_pb2.HeartbeatRequest(worker_id="w1", load=load()))
    event = await asyncio.wait_for(everything.read(), 1.0)
    assert event.type == EventType.WORKER_EVENT_TYPE_UPDATED and event.worker.load.running_requests == 1

    await stub.CordonWorker(registry_pb2.CordonWorkerRequest(worker_id="w2", cordoned=True))
    cordoned = (EventType.WORKER_EVENT_TYPE_UPDATED, "w2", registry_pb2.WORKER_STATUS_CORDONED)
    assert await next_event(everything) == cordoned
    assert await next_event(only_qwen) == cordoned

    # w2 re-registers without qwen2: the filtered watch sees it leave.
    await stub.RegisterWorker(registry_pb2.RegisterWorkerRequest(worker=worker("w2", ("tiny",))))
    assert (await next_event(only_qwen))[:2] == (EventType.WORKER_EVENT_TYPE_REMOVED, "w2")
    assert (await next_event(everything))[:2] == (EventType.WORKER_EVENT_TYPE_UPDATED, "w2")

    await stub.DeregisterWorker(registry_pb2.DeregisterWorkerRequest(worker_id="w1"))
    gone = (EventType.WORKER_EVENT_TYPE_REMOVED, "w1", registry_pb2.WORKER_STATUS_GONE)
    assert await next_event(everything) == gone
    everything.cancel()
    only_qwen.cancel()


async def test_watch_ends_when_registry_stops(make_registry: Any) -> None:
    running, stub = await make_registry()
    stream = stub.WatchWorkers(registry_pb2.WatchWorkersRequest())
    assert (await stream.read()).type == EventType.WORKER_EVENT_TYPE_SNAPSHOT_END
    await asyncio.wait_for(running.stop(5.0), 1.0)  # watchers are ended, not waited for

    async def until_closed() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await stream.read() is not grpc.aio.EOF:
                pass

    await asyncio.wait_for(until_closed(), 1.0)


async def test_a_watcher_that_falls_behind_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers_module, "WATCH_QUEUE_LIMIT", 2)
    table = workers_module.WorkerTable(ttl_s=10)
    stream = table.watch()
    assert (await anext(stream)).type == EventType.WORKER_EVENT_TYPE_SNAPSHOT_END
    for i in range(4):
        table.register(worker(f"w{i}"))
    assert [(await anext(stream)).worker.worker_id for _ in range(2)] == ["w0", "w1"]
    with pytest.raises(DependencyDown, match="fell more than 2 events behind; watch again"):
        await anext(stream)
    assert table.watcher_count == 0
