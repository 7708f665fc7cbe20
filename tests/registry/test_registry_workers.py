"""Worker membership over gRPC: register, heartbeat, TTL eviction, drain/cordon, bad input."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.v1 import common_pb2
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

Worker = registry_pb2.Worker


def register(worker_id: str = "w1", address: str = "127.0.0.1:7001", models: tuple[str, ...] = ("tiny",)):
    return registry_pb2.RegisterWorkerRequest(
        worker=Worker(worker_id=worker_id, address=address, models=list(models), engine="vllm", capacity=4)
    )


async def eventually(predicate: Any, timeout: float = 2.0) -> None:
    """Poll an async predicate until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_register_heartbeat_and_evict_after_ttl(make_registry: Any) -> None:
    running, stub = await make_registry(ttl=0.5, interval=0.1)
    health = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(f"127.0.0.1:{running.port}"))
    assert (
        await health.Check(health_pb2.HealthCheckRequest())
    ).status == health_pb2.HealthCheckResponse.SERVING

    answer = await stub.RegisterWorker(register(models=("tiny", "tiny-llama")))
    assert answer.lease_ttl_seconds == 1 and answer.heartbeat_interval_seconds == 1
    (worker,) = (await stub.ListWorkers(registry_pb2.ListWorkersRequest())).workers
    assert list(worker.models) == ["tiny-llama"]  # aliases resolve; duplicates fold
    assert worker.status == registry_pb2.WORKER_STATUS_READY and worker.registered_at.seconds > 0

    load = common_pb2.WorkerLoad(running_requests=3, kv_cache_usage=0.25)
    for _ in range(3):  # 0.9 s of heartbeats: longer than the TTL, still live
        await asyncio.sleep(0.3)
        beat = await stub.Heartbeat(registry_pb2.HeartbeatRequest(worker_id="w1", load=load))
        assert beat.known and beat.status == registry_pb2.WORKER_STATUS_READY
    (worker,) = (await stub.ListWorkers(registry_pb2.ListWorkersRequest(model="tiny"))).workers
    assert worker.load.running_requests == 3

    async def evicted() -> bool:
        return not (await stub.ListWorkers(registry_pb2.ListWorkersRequest())).workers

    await eventually(evicted, timeout=1.0)
    assert not (await stub.Heartbeat(registry_pb2.HeartbeatRequest(worker_id="w1"))).known


async def test_drain_cordon_and_deregister(make_registry: Any) -> None:
    _, stub = await make_registry()
    await stub.RegisterWorker(register("w1"))
    await stub.RegisterWorker(register("w2", "127.0.0.1:7002", ("qwen2",)))

    drained = await stub.DrainWorker(registry_pb2.DrainWorkerRequest(worker_id="w1"))
    assert drained.worker.status == registry_pb2.WORKER_STATUS_DRAINING
    beat = await stub.Heartbeat(registry_pb2.HeartbeatRequest(worker_id="w1"))
    assert beat.status == registry_pb2.WORKER_STATUS_DRAINING  # the worker learns of the drain
    models = (await stub.ListModels(registry_pb2.ListModelsRequest(only_ready=True))).models
    assert [m.name for m in models] == ["qwen2-0.5b-instruct"]  # draining workers are not ready

    cordoned = await stub.CordonWorker(registry_pb2.CordonWorkerRequest(worker_id="w2", cordoned=True))
    assert cordoned.worker.status == registry_pb2.WORKER_STATUS_CORDONED
    await stub.RegisterWorker(register("w2", "127.0.0.1:7002", ("qwen2",)))  # a cordon survives re-joining
    (w2,) = (await stub.ListWorkers(registry_pb2.ListWorkersRequest(model="qwen2"))).workers
    assert w2.status == registry_pb2.WORKER_STATUS_CORDONED
    uncordoned = await stub.CordonWorker(registry_pb2.CordonWorkerRequest(worker_id="w2", cordoned=False))
    assert uncordoned.worker.status == registry_pb2.WORKER_STATUS_READY

    await stub.DeregisterWorker(registry_pb2.DeregisterWorkerRequest(worker_id="w1"))
    await stub.DeregisterWorker(registry_pb2.DeregisterWorkerRequest(worker_id="w1"))  # idempotent
    listed = await stub.ListWorkers(registry_pb2.ListWorkersRequest())
    assert [w.worker_id for w in listed.workers] == ["w2"]


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (register(worker_id=""), grpc.StatusCode.INVALID_ARGUMENT, "worker_id is required"),
        (register(address=""), grpc.StatusCode.INVALID_ARGUMENT, "worker.address is required"),
        (register(address="nohost"), grpc.StatusCode.INVALID_ARGUMENT, "is not host:port"),
        (register(address="h:99999"), grpc.StatusCode.INVALID_ARGUMENT, "is not host:port"),
        (register(models=()), grpc.StatusCode.INVALID_ARGUMENT, "worker.models is required"),
        (register(models=("tiny", "gpt-5")), grpc.StatusCode.INVALID_ARGUMENT, "does not know: ['gpt-5']"),
    ],
    ids=["no-id", "no-address", "bad-address", "bad-port", "no-models", "unknown-model"],
)
async def test_bad_registrations_are_rejected(
    make_registry: Any, request_: Any, code: grpc.StatusCode, needle: str
) -> None:
    _, stub = await make_registry()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RegisterWorker(request_)
    assert err.value.code() == code
    assert needle in err.value.details()


async def test_other_bad_input(make_registry: Any) -> None:
    _, stub = await make_registry()
    calls = [
        (stub.GetModel(registry_pb2.GetModelRequest()), grpc.StatusCode.INVALID_ARGUMENT, "name is required"),
        (stub.Heartbeat(registry_pb2.HeartbeatRequest()), grpc.StatusCode.INVALID_ARGUMENT, "worker_id"),
        (
            stub.DrainWorker(registry_pb2.DrainWorkerRequest(worker_id="ghost")),
            grpc.StatusCode.NOT_FOUND,
            "no live worker 'ghost'",
        ),
        (
            stub.CreateModel(registry_pb2.CreateModelRequest(model=registry_pb2.Model(name="bad name!"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model.name 'bad name!' is not a valid name",
        ),
        (
            stub.StartModelInstance(registry_pb2.StartModelInstanceRequest(model="m")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "no supervisor attached",
        ),
        (
            stub.Heartbeat(
                registry_pb2.HeartbeatRequest(worker_id="w", status=registry_pb2.WORKER_STATUS_CORDONED)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "status: a worker reports READY, DRAINING or FAILED",
        ),
    ]
    for call, code, needle in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == code, err.value.details()
        assert needle in err.value.details()
