"""SchedulerService over gRPC, fed by a real registry's watch."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2
from tests.scheduler.stack import Stack

Acquire = scheduler_pb2.AcquireRequest


def acquire(
    request_id: str, prompt: int = 10, max_tokens: int = 10, **kwargs: object
) -> scheduler_pb2.AcquireRequest:
    return Acquire(
        request_id=request_id, model="tiny-llama", prompt_tokens=prompt, max_tokens=max_tokens, **kwargs
    )  # type: ignore[arg-type]


async def test_least_outstanding_tokens_and_status(stack: Stack) -> None:
    await stack.add_worker("w1")
    await stack.add_worker("w2")
    big = (await stack.scheduler.Acquire(acquire("r1", 500, 500))).lease
    small = (await stack.scheduler.Acquire(acquire("r2"))).lease
    assert {big.worker_id, small.worker_id} == {"w1", "w2"}
    assert small.worker_address == f"{small.worker_id}.local:7000" and small.model == "tiny-llama"
    third = (await stack.scheduler.Acquire(acquire("r3"))).lease
    assert third.worker_id == small.worker_id
    status = await stack.scheduler.GetSchedulerStatus(
        scheduler_pb2.GetSchedulerStatusRequest(model="tiny-llama")
    )
    by_id = {w.worker_id: w for w in status.workers}
    assert by_id[big.worker_id].outstanding_tokens == 1000 and by_id[small.worker_id].active_leases == 2
    assert [(q.model, q.active) for q in status.queues] == [("tiny-llama", 3)]
    assert status.leases_granted == 3
    released = await stack.scheduler.Release(scheduler_pb2.ReleaseRequest(lease_id=big.lease_id))
    assert released.released
    again = await stack.scheduler.Release(scheduler_pb2.ReleaseRequest(lease_id=big.lease_id))
    assert not again.released


async def test_exhausted_capacity_is_resource_exhausted_with_retry_hint(stack: Stack) -> None:
    await stack.add_worker("w1", capacity=1)
    await stack.scheduler.Acquire(acquire("r1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.scheduler.Acquire(acquire("r2"), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no capacity for model 'tiny-llama': 1 worker(s) busy" in err.value.details()
    trailers = dict(err.value.trailing_metadata() or ())
    assert int(trailers["retry-after-ms"]) > 0


async def test_queued_acquire_succeeds_when_a_lease_is_released(stack: Stack) -> None:
    await stack.add_worker("w1", capacity=1)
    held = (await stack.scheduler.Acquire(acquire("r1"))).lease
    waiting = asyncio.ensure_future(stack.scheduler.Acquire(acquire("r2"), timeout=3))
    await stack.until(lambda s: s.queues and s.queues[0].waiting == 1)
    await asyncio.sleep(0.05)
    await stack.scheduler.Release(scheduler_pb2.ReleaseRequest(lease_id=held.lease_id))
    lease = (await asyncio.wait_for(waiting, 2)).lease
    assert lease.worker_id == "w1" and lease.queued_ms >= 50


async def test_exclude_and_failed_outcome_ejects(stack: Stack) -> None:
    await stack.add_worker("w1")
    await stack.add_worker("w2")
    first = (await stack.scheduler.Acquire(acquire("r1", exclude_workers=["w1"]))).lease
    assert first.worker_id == "w2"
    await stack.scheduler.Release(
        scheduler_pb2.ReleaseRequest(
            lease_id=first.lease_id, outcome=scheduler_pb2.OUTCOME_WORKER_FAILED, error="boom"
        )
    )
    status = await stack.scheduler.GetSchedulerStatus(scheduler_pb2.GetSchedulerStatusRequest())
    assert [w.worker_id for w in status.workers if w.ejected] == ["w2"]
    # The gateway's retry excludes the failed worker; other requests avoid it during the cool-down.
    retry = (await stack.scheduler.Acquire(acquire("r1", exclude_workers=["w2"]))).lease
    assert retry.worker_id == "w1"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.scheduler.Acquire(acquire("r2", exclude_workers=["w1", "w2"]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "besides the excluded" in err.value.details()


async def test_no_worker_is_unavailable(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.scheduler.Acquire(acquire("r1"), timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no live worker serves model 'tiny-llama'" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.scheduler.Acquire(Acquire(request_id="r2"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_worker_removal_and_cordon_through_the_registry_watch(stack: Stack) -> None:
    await stack.add_worker("w1")
    await stack.add_worker("w2")
    lease = (await stack.scheduler.Acquire(acquire("r1", exclude_workers=["w2"]))).lease
    assert lease.worker_id == "w1"

    # w1 leaves while r1 still streams from it: it stays, cordoned, its lease counted, until r1 ends.
    await stack.registry.DeregisterWorker(registry_pb2.DeregisterWorkerRequest(worker_id="w1"))
    await stack.until(
        lambda s: ("w1", True, 1) in [(w.worker_id, w.cordoned, w.active_leases) for w in s.workers]
    )
    assert (await stack.scheduler.Acquire(acquire("r2"))).lease.worker_id == "w2"
    assert (await stack.scheduler.Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id))).released
    await stack.until(lambda s: [w.worker_id for w in s.workers] == ["w2"], timeout=3.0)

    await stack.registry.DrainWorker(registry_pb2.DrainWorkerRequest(worker_id="w2"))
    await stack.until(lambda s: s.workers[0].cordoned)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.scheduler.Acquire(acquire("r3"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "1 cordoned or draining" in err.value.details()


async def test_routing_policy_and_unimplemented_scaling(stack: Stack) -> None:
    set_rr = scheduler_pb2.SetRoutingPolicyRequest(
        model="tiny-llama", policy=scheduler_pb2.ROUTING_POLICY_ROUND_ROBIN
    )
    assert (await stack.scheduler.SetRoutingPolicy(set_rr)).policy == scheduler_pb2.ROUTING_POLICY_ROUND_ROBIN
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.scheduler.SetRoutingPolicy(
            scheduler_pb2.SetRoutingPolicyRequest(
                model="tiny-llama", policy=scheduler_pb2.ROUTING_POLICY_SESSION_AFFINITY
            )
        )
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.scheduler.GetScalingSignals(scheduler_pb2.GetScalingSignalsRequest())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
