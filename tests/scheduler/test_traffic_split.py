"""Canary routing: the registry's traffic split decides which version's workers get the leases."""

from __future__ import annotations

import asyncio
from collections import Counter

from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2
from tests.scheduler.stack import Stack

ADMIN = (("x-llmesh-role", "admin"), ("x-llmesh-user", "ops"))


async def _worker(stack: Stack, worker_id: str, version: str) -> None:
    await stack.registry.RegisterWorker(
        registry_pb2.RegisterWorkerRequest(
            worker=registry_pb2.Worker(
                worker_id=worker_id,
                address=f"127.0.0.{len(worker_id)}:7{version[-1]}00",
                models=["tiny-llama"],
                capacity=4,
                model_versions={"tiny-llama": version},
            )
        )
    )


async def _leases_by_worker(stack: Stack, count: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for i in range(count):
        lease = (
            await stack.scheduler.Acquire(scheduler_pb2.AcquireRequest(request_id=f"r{i}", model="tiny"))
        ).lease
        seen[lease.worker_id] += 1
        await stack.scheduler.Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id))
    return seen


async def _split_reaches_the_scheduler(stack: Stack, expected: dict[str, int]) -> None:
    # The split travels registry -> WatchTrafficWeights -> scheduler; wait until leases follow it.
    for _ in range(100):
        seen = await _leases_by_worker(stack, 40)
        if set(seen) == {f"w-{v}" for v, w in expected.items() if w}:
            return
        await asyncio.sleep(0.05)


async def test_weights_90_10_split_1000_leases_and_a_rollback_is_one_call(stack: Stack) -> None:
    canary = registry_pb2.Model(
        name="tiny-llama",
        version="v2",
        engine=registry_pb2.EngineSettings(engine="vllm", source="/m/v2", max_model_len=2048),
    )
    await stack.registry.CreateModel(registry_pb2.CreateModelRequest(model=canary), metadata=ADMIN)
    await _worker(stack, "w-v1", "v1")
    await _worker(stack, "w-v2", "v2")
    await stack.until(lambda s: len(s.workers) == 2)

    await stack.registry.SetTrafficWeights(
        registry_pb2.SetTrafficWeightsRequest(name="tiny", weights={"v1": 90, "v2": 10}), metadata=ADMIN
    )
    await asyncio.sleep(0.2)
    seen = await _leases_by_worker(stack, 1000)
    assert 870 <= seen["w-v1"] <= 930 and seen["w-v1"] + seen["w-v2"] == 1000, seen

    await stack.registry.SetTrafficWeights(
        registry_pb2.SetTrafficWeightsRequest(name="tiny", weights={"v1": 100}), metadata=ADMIN
    )
    await _split_reaches_the_scheduler(stack, {"v1": 100})
    assert await _leases_by_worker(stack, 100) == Counter({"w-v1": 100})
