"""A worker whose engine reports a failure leaves the pool, goes NOT_SERVING and stops with
ServiceFailed (its process then exits non-zero). The engine is a test double (the scripted engine
with a settable failure): this is about the worker's reaction; the e2e suite kills a real vLLM
engine core."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.server import ServiceFailed, serve_until_signal
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.worker.engine import Supervised
from llmesh.worker.scripted_engine import ScriptedEngine, ScriptedSettings
from tests.scripted_stack import MODEL


class DyingEngine(ScriptedEngine):
    """Test double: the scripted engine, plus a failure the test sets."""

    reason: str | None = None

    def failure(self) -> str | None:
        return self.reason


async def test_a_failed_engine_takes_its_worker_out_of_the_pool_and_stops_it(stack_factory) -> None:
    engine = DyingEngine(ScriptedSettings(model=MODEL.name, max_model_len=MODEL.max_model_len))
    assert isinstance(engine, Supervised)
    stack = await stack_factory(
        {
            "w0": engine,
            "w1": DyingEngine(ScriptedSettings(model=MODEL.name, max_model_len=MODEL.max_model_len)),
        }
    )
    worker = next(s for s in stack.servers if s.name == "worker w0")
    engine.reason = "engine core process exited (test)"

    deadline = time.monotonic() + 10
    while True:
        status = await stack.scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
        if {w.worker_id for w in status.workers} == {"w1"}:
            break
        assert time.monotonic() < deadline, f"w0 still in the pool: {[w.worker_id for w in status.workers]}"
        await asyncio.sleep(0.1)
    assert worker.failure == "engine failed: engine core process exited (test)"
    async with grpc.aio.insecure_channel(stack.worker_addresses["w0"]) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(ServiceFailed, match="engine failed"):
        await asyncio.wait_for(serve_until_signal(worker, grace=1.0), timeout=10)
