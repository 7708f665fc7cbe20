"""WorkerPool on its own: choice, capacity, queueing, exclusion, ejection, reclaiming."""

from __future__ import annotations

import asyncio

import pytest

from llmesh.common.errors import DependencyDown, InvalidRequest, NotImplementedYet, OverCapacity
from llmesh.scheduler.pool import WorkerPool
from llmesh.scheduler.records import Demand, WorkerSpec
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(*workers: tuple[str, int], clock: FakeClock | None = None, **kwargs: float) -> WorkerPool:
    pool = WorkerPool(clock=clock or FakeClock(), **kwargs)  # type: ignore[arg-type]
    pool.replace_workers(
        WorkerSpec(worker_id=wid, address=f"127.0.0.1:{7000 + i}", models=frozenset({"m"}), capacity=cap)
        for i, (wid, cap) in enumerate(workers)
    )
    return pool


def demand(request_id: str, prompt: int = 10, max_tokens: int = 10, **kwargs: object) -> Demand:
    return Demand(request_id=request_id, model="m", prompt_tokens=prompt, max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]


async def test_least_outstanding_tokens_wins() -> None:
    pool = make_pool(("a", 4), ("b", 4))
    big = await pool.acquire(demand("r1", 1000, 1000), 0)
    small = await pool.acquire(demand("r2", 10, 10), 0)
    assert {big.worker_id, small.worker_id} == {"a", "b"}
    third = await pool.acquire(demand("r3", 10, 10), 0)
    assert third.worker_id == small.worker_id  # 20 outstanding beats 2000
    assert pool.release(big.lease_id)
    fourth = await pool.acquire(demand("r4", 10, 10), 0)
    assert fourth.worker_id == big.worker_id
    assert not pool.release(big.lease_id)  # releasing twice is a no-op


async def test_round_robin_and_policy_validation() -> None:
    pool = make_pool(("a", 4), ("b", 4), ("c", 4))
    pool.set_policy("m", scheduler_pb2.ROUTING_POLICY_ROUND_ROBIN)
    chosen = [(await pool.acquire(demand(f"r{i}"), 0)).worker_id for i in range(4)]
    assert chosen == ["a", "b", "c", "a"]
    with pytest.raises(NotImplementedYet, match="PREFIX_AFFINITY is not implemented yet"):
        pool.set_policy("m", scheduler_pb2.ROUTING_POLICY_PREFIX_AFFINITY)
    with pytest.raises(InvalidRequest):
        pool.set_policy("m", scheduler_pb2.ROUTING_POLICY_UNSPECIFIED)


async def test_idempotent_acquire_per_request_id() -> None:
    pool = make_pool(("a", 4), ("b", 4))
    first = await pool.acquire(demand("r1"), 0)
    assert await pool.acquire(demand("r1"), 0) == first
    retry = await pool.acquire(demand("r1", exclude_workers=frozenset({first.worker_id})), 0)
    assert retry.worker_id != first.worker_id  # a retry that excludes the worker gets a new lease


async def test_full_queue_and_no_wait_are_over_capacity() -> None:
    pool = make_pool(("a", 1), max_queue_depth=1)
    await pool.acquire(demand("r1"), 0)
    with pytest.raises(OverCapacity, match=r"no capacity for model 'm': 1 worker\(s\) busy") as err:
        await pool.acquire(demand("r2"), 0)
    assert err.value.retry_after_s is not None and err.value.retry_after_s > 0
    waiting = asyncio.create_task(pool.acquire(demand("r3"), 5))
    await asyncio.sleep(0)
    with pytest.raises(OverCapacity, match="queue full"):
        await pool.acquire(demand("r4"), 5)
    waiting.cancel()
    assert pool.counters.leases_rejected == 2


async def test_waiters_are_served_in_order_when_capacity_frees() -> None:
    pool = make_pool(("a", 1))
    held = await pool.acquire(demand("r1"), 0)
    second = asyncio.create_task(pool.acquire(demand("r2"), 5))
    third = asyncio.create_task(pool.acquire(demand("r3"), 5))
    duplicate = asyncio.create_task(pool.acquire(demand("r2"), 5))  # same request id joins r2's place
    await asyncio.sleep(0)
    assert pool.queue_view("m") == [("m", 2, 1, scheduler_pb2.ROUTING_POLICY_LEAST_OUTSTANDING_TOKENS)]
    pool.release(held.lease_id)
    lease = await asyncio.wait_for(second, 1)
    assert (await asyncio.wait_for(duplicate, 1)) == lease
    assert not third.done()
    pool.release(lease.lease_id)
    assert (await asyncio.wait_for(third, 1)).worker_id == "a"


async def test_wait_times_out_and_cancelled_waiter_leaves() -> None:
    pool = make_pool(("a", 1))
    await pool.acquire(demand("r1"), 0)
    with pytest.raises(OverCapacity, match=r"waited 0\.1s"):
        await pool.acquire(demand("r2"), 0.1)
    cancelled = asyncio.create_task(pool.acquire(demand("r3"), 5))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert pool.queue_view("m")[0][1] == 0


async def test_exclusion_and_unserved_models_are_dependency_down() -> None:
    pool = make_pool(("a", 1), ("b", 1))
    with pytest.raises(DependencyDown, match="no live worker serves model 'other'"):
        await pool.acquire(Demand(request_id="r0", model="other"), 1)
    with pytest.raises(DependencyDown, match=r"besides the excluded \['a', 'b'\]"):
        await pool.acquire(demand("r1", exclude_workers=frozenset({"a", "b"})), 1)
    lease = await pool.acquire(demand("r2", exclude_workers=frozenset({"a"})), 0)
    assert lease.worker_id == "b"


async def test_failure_ejects_until_cool_down_ends() -> None:
    clock = FakeClock()
    pool = make_pool(("a", 2), ("b", 2), clock=clock, eject_s=0.2)
    lease = await pool.acquire(demand("r1"), 0)
    pool.release(lease.lease_id, scheduler_pb2.OUTCOME_WORKER_FAILED)
    failed = lease.worker_id
    assert pool.is_ejected(next(w for w in pool.workers() if w.worker_id == failed))
    for i in range(2):  # the failed worker has the least outstanding tokens, yet is skipped
        assert (await pool.acquire(demand(f"r{i + 2}", 1, 1), 0)).worker_id != failed
    with pytest.raises(OverCapacity, match=r"\(1 ejected after failures\)"):
        await pool.acquire(demand("r4"), 0)
    clock.now += 0.3
    assert not pool.is_ejected(next(w for w in pool.workers() if w.worker_id == failed))
    assert (await pool.acquire(demand("r5"), 0)).worker_id == failed


async def test_removed_worker_drops_leases_and_fails_its_waiters() -> None:
    pool = make_pool(("a", 1))
    lease = await pool.acquire(demand("r1"), 0)
    waiter = asyncio.create_task(pool.acquire(demand("r2"), 5))
    await asyncio.sleep(0)
    pool.remove_worker("a")
    with pytest.raises(DependencyDown, match="no live worker serves model 'm'"):
        await asyncio.wait_for(waiter, 1)
    assert not pool.release(lease.lease_id)


async def test_cordoned_workers_get_no_leases_and_stale_leases_are_reclaimed() -> None:
    clock = FakeClock()
    pool = make_pool(("a", 1), ("b", 1), clock=clock, lease_timeout_s=60)
    pool.upsert_worker(WorkerSpec("b", "127.0.0.1:7001", frozenset({"m"}), capacity=1, cordoned=True))
    lease = await pool.acquire(demand("r1"), 0)
    assert lease.worker_id == "a"
    clock.now += 61
    assert pool.reclaim_expired() == 1
    assert not pool.release(lease.lease_id)
    assert (await pool.acquire(demand("r2"), 0)).worker_id == "a"


async def test_not_synced_is_dependency_down() -> None:
    with pytest.raises(DependencyDown, match="has not received the worker list"):
        await WorkerPool().acquire(demand("r1"), 0)
