"""The token path on the real stack: Envoy streams from vLLM workers (CPU, tiny model) directly,
the scheduler picks and leases; worker faults, client cancels and draining as a user meets them.

Tests that kill or stop a worker start it again before they end (the stack is shared).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import grpc
import httpx
import psutil
import pytest
from google.protobuf import struct_pb2

from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from llmesh.worker.v1 import worker_service_pb2 as worker_pb
from llmesh.worker.v1 import worker_service_pb2_grpc as worker_grpc
from tests.e2e.stack_ops import restart_worker, wait_until_only_healthy
from tests.support import VllmStack, require

pytestmark = pytest.mark.vllm

# Long enough that the engine is still generating when a client has read its first chunks (about a
# millisecond per token on an idle CPU), within the stack's max_output_tokens.
LONG_STREAM_TOKENS = 2000


def edge(stack: VllmStack) -> str:
    require(bool(stack.edge), "Envoy is not installed (pip install -e '.[edge]')")
    return stack.edge


def chat(stack: VllmStack, **fields: object) -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(
        model=stack.model,
        messages=[pb.ChatMessage(role="user", content=struct_pb2.Value(string_value="Tell me a story"))],
        ignore_eos=True,
        **fields,  # type: ignore[arg-type]
    )


async def leases(stack: VllmStack) -> dict[str, int]:
    """Active leases per worker, from the picker's pool."""
    async with grpc.aio.insecure_channel(stack.scheduler) as channel:
        status = await sched_grpc.SchedulerServiceStub(channel).GetSchedulerStatus(
            sched_pb.GetSchedulerStatusRequest()
        )
    return {w.worker_id: w.active_leases for w in status.workers}


async def engine_requests(stack: VllmStack) -> int:
    """Requests running or waiting in every worker's engine."""
    total = 0
    for address in stack.workers.values():
        async with grpc.aio.insecure_channel(address) as channel:
            load = (await worker_grpc.WorkerServiceStub(channel).GetLoad(worker_pb.GetLoadRequest())).load
        total += load.running_requests + load.waiting_requests
    return total


async def serving_worker(stack: VllmStack) -> str:
    """The one worker whose engine is running a request (its own exact count)."""
    busy = []
    for worker_id, address in stack.workers.items():
        async with grpc.aio.insecure_channel(address) as channel:
            load = (await worker_grpc.WorkerServiceStub(channel).GetLoad(worker_pb.GetLoadRequest())).load
        if load.running_requests + load.waiting_requests:
            busy.append(worker_id)
    assert len(busy) == 1, f"expected one busy worker, got {busy}"
    return busy[0]


async def until(predicate, timeout_s: float, what: str) -> float:
    """Poll an async predicate; returns the seconds it took."""
    began = time.monotonic()
    while not await predicate():
        assert time.monotonic() - began < timeout_s, f"{what} did not happen within {timeout_s} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - began


async def test_sse_stream_reaches_the_client_while_the_engine_still_generates(vllm_stack: VllmStack) -> None:
    body = {
        "model": vllm_stack.model,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": LONG_STREAM_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    engine_busy_at_first_text = None
    buffer = ""
    async with (
        httpx.AsyncClient(base_url=f"http://{edge(vllm_stack)}", timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for text in response.aiter_text():
            buffer += text
            if engine_busy_at_first_text is None and '"content"' in buffer:
                engine_busy_at_first_text = await engine_requests(vllm_stack)
    # Token by token: the first text is here while the engine still has most of the stream to
    # generate. A stream held back anywhere (worker, Envoy, a starved proxy) arrives after the
    # engine is done, as it did when the engine's busy-polling core out-ranked Envoy.
    assert engine_busy_at_first_text == 1
    frames = [f for f in buffer.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]" and frames.count("data: [DONE]") == 1
    chunks = [json.loads(f[len("data: ") :]) for f in frames[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(chunks) >= 16 and text, f"{LONG_STREAM_TOKENS} tokens came in only {len(chunks)} chunks"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_engine_processes_run_below_the_data_plane(vllm_stack: VllmStack) -> None:
    for child in vllm_stack.stack.children:
        if child.kind != "worker":
            continue
        engine = psutil.Process(child.process.pid).children(recursive=True)
        assert engine, f"{child.name} has no engine processes"
        assert os.getpriority(os.PRIO_PROCESS, child.process.pid) == 0
        assert {os.getpriority(os.PRIO_PROCESS, t.id) for p in engine for t in p.threads()} == {10}
    envoy = vllm_stack.stack.child("envoy").process.pid
    assert os.getpriority(os.PRIO_PROCESS, envoy) == 0


def test_the_data_plane_stays_off_the_cpus_the_engines_compute_on(vllm_stack: VllmStack) -> None:
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip(f"vLLM binds its computation to every CPU when there is one ({sorted(cpus)})")
    compute: set[int] = set()
    for child in vllm_stack.stack.children:
        if child.kind != "worker":
            continue
        # vLLM's CPU backend binds its model-computing process to all CPUs but the reserved ones;
        # the worker reports them, and it and the rest of its engine (the engine core) moved off.
        bound = set(child.info["engine_cpus"])  # type: ignore[call-overload]
        assert bound and bound < cpus, f"{child.name} reports engine CPUs {sorted(bound)}"
        engine = psutil.Process(child.process.pid).children(recursive=True)
        computing = [p for p in engine if os.sched_getaffinity(p.pid) == bound]
        assert {p.name() for p in computing} == {"VLLM::Worker"}
        for process in [psutil.Process(child.process.pid), *(p for p in engine if p not in computing)]:
            assert {cpu for t in process.threads() for cpu in os.sched_getaffinity(t.id)} == cpus - bound
        compute |= bound
    for name in ("envoy", "scheduler", "registry", "auth"):
        assert os.sched_getaffinity(vllm_stack.stack.child(name).process.pid) == cpus - compute, name


async def test_client_cancel_aborts_the_engine_request_and_releases_the_lease(vllm_stack: VllmStack) -> None:
    # An OpenAI-style client that stops reading and closes its connection after two chunks. (A
    # grpc-python client's cancel is covered on the in-process stack: its RST can trail its reads.)
    body = {
        "model": vllm_stack.model,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": LONG_STREAM_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    for attempt in range(20):
        async with httpx.AsyncClient(base_url=f"http://{edge(vllm_stack)}", timeout=60) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                frames = 0
                async for text in response.aiter_text():
                    frames += text.count("\n\n")
                    if frames >= 2:
                        break
        cancelled_at = time.monotonic()

        async def idle() -> bool:
            return await engine_requests(vllm_stack) == 0 and sum((await leases(vllm_stack)).values()) == 0

        await until(idle, 5.0, f"attempt {attempt}: engine abort and lease release")
        # 2,000 tokens take seconds on this CPU: idle within a second means the engine aborted.
        took = time.monotonic() - cancelled_at
        assert took < 1.0, f"attempt {attempt}: idle only {took:.2f} s after the client left"


async def test_two_requests_with_the_same_request_id_run_on_their_own_leases(vllm_stack: VllmStack) -> None:
    metadata = (("x-request-id", "duplicate-id"),)
    async with grpc.aio.insecure_channel(edge(vllm_stack)) as channel:
        models = pb_grpc.ModelServiceStub(channel)
        calls = [
            models.StreamChatCompletion(chat(vllm_stack, max_tokens=16), metadata=metadata) for _ in range(2)
        ]

        async def drain(call) -> list[pb.StreamChatCompletionResponse]:
            return [c async for c in call]

        results = await asyncio.gather(*(drain(c) for c in calls))
    assert all(sum(1 for c in chunks if c.choices) >= 2 for chunks in results)
    assert all(chunks[-1].choices[0].finish_reason == "length" for chunks in results)
    ids = {chunks[0].id for chunks in results}
    assert len(ids) == 2 and not any("duplicate-id" in i for i in ids)


def envoy_stat(stack: VllmStack, name: str) -> int:
    with httpx.Client(timeout=5) as client:
        stats = client.get(f"http://127.0.0.1:{stack.edge_admin_port}/stats", params={"filter": name}).text
    return sum(int(line.split(": ")[1]) for line in stats.splitlines() if line.split(": ")[0] == name)


async def test_a_worker_killed_before_the_first_token_costs_the_client_nothing(vllm_stack: VllmStack) -> None:
    edge(vllm_stack)
    retries_before = envoy_stat(vllm_stack, "cluster.llmesh_workers.upstream_rq_retry")
    vllm_stack.stack.kill("worker-1")  # its address stays in the pool until the registry's TTL
    try:
        async with grpc.aio.insecure_channel(vllm_stack.edge) as channel:
            models = pb_grpc.ModelServiceStub(channel)
            replies = await asyncio.gather(
                *(models.CreateChatCompletion(chat(vllm_stack, max_tokens=8)) for _ in range(6))
            )
        assert all(r.usage.completion_tokens == 8 for r in replies)
        # Some of them were leased on the dead worker and retried by Envoy on the fallback.
        assert envoy_stat(vllm_stack, "cluster.llmesh_workers.upstream_rq_retry") > retries_before
    finally:
        restart_worker(vllm_stack, "worker-1")


async def test_a_worker_killed_mid_stream_gives_a_clean_error_and_frees_the_lease(
    vllm_stack: VllmStack,
) -> None:
    edge(vllm_stack)
    async with grpc.aio.insecure_channel(vllm_stack.edge) as channel:
        call = pb_grpc.ModelServiceStub(channel).StreamChatCompletion(
            chat(vllm_stack, max_tokens=LONG_STREAM_TOKENS)
        )
        received = [await call.read(), await call.read()]
        serving = [w for w, n in (await leases(vllm_stack)).items() if n]
        assert len(serving) == 1
        vllm_stack.stack.kill(serving[0])
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        break
                    received.append(message)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
            assert all(m.choices for m in received[:2])

            async def released() -> bool:
                return (await leases(vllm_stack)).get(serving[0], 0) == 0

            # Well inside the registry's 5 s TTL: the picker saw the stream end.
            assert await until(released, 5.0, "lease release") < 2.0
        finally:
            restart_worker(vllm_stack, serving[0])


async def test_sigterm_lets_the_stream_in_flight_finish_and_sends_new_work_elsewhere(
    vllm_stack: VllmStack,
) -> None:
    body = {
        "model": vllm_stack.model,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        # Long enough to be running when the first text arrives, short enough to finish well
        # inside the worker's 30 s shutdown grace on a loaded machine.
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=f"http://{edge(vllm_stack)}", timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        texts = response.aiter_text()
        buffer = await anext(texts)
        draining = await serving_worker(vllm_stack)
        other = next(w for w in vllm_stack.workers if w != draining)
        child = vllm_stack.stack.child(draining)
        child.process.send_signal(signal.SIGTERM)
        try:
            # The draining worker stays listed (DRAINING) while its stream runs; only the other
            # takes new requests.
            await asyncio.to_thread(wait_until_only_healthy, vllm_stack, vllm_stack.workers[other])
            reply = await client.post(
                "/v1/chat/completions",
                json={**body, "max_tokens": 4, "stream": False},
            )
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
            async for text in texts:
                buffer += text
            frames = [f for f in buffer.split("\n\n") if f]
            assert frames[-1] == "data: [DONE]"
            chunks = [json.loads(f[len("data: ") :]) for f in frames[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            tokens = sum(1 for c in chunks for choice in c["choices"] if choice["delta"].get("content"))
            assert tokens > 100, "the stream was cut short"
            assert await asyncio.to_thread(child.process.wait, 60) == 0
            vllm_stack.stack.children.remove(child)
        finally:
            restart_worker(vllm_stack, draining)


async def test_a_worker_whose_engine_dies_leaves_the_pool_and_exits_non_zero(vllm_stack: VllmStack) -> None:
    edge(vllm_stack)
    worker_id = "worker-1"
    child = vllm_stack.stack.child(worker_id)
    cores = [
        p for p in psutil.Process(child.process.pid).children() if p.name().startswith("VLLM::EngineCor")
    ]
    assert len(cores) == 1, [p.name() for p in psutil.Process(child.process.pid).children()]
    cores[0].kill()
    try:
        # The worker process exits non-zero (a supervisor restarts it) after leaving the pool.
        assert await asyncio.to_thread(child.process.wait, 30) == 1
        assert "engine failed" in child.log_file.read_text()

        async def gone() -> bool:
            return worker_id not in await leases(vllm_stack)

        await until(gone, 10.0, "the dead worker leaving the picker's pool")
        # New work goes to the other worker.
        async with grpc.aio.insecure_channel(vllm_stack.edge) as channel:
            reply = await pb_grpc.ModelServiceStub(channel).CreateChatCompletion(
                chat(vllm_stack, max_tokens=4)
            )
        assert reply.usage.completion_tokens == 4
        vllm_stack.stack.children.remove(child)
    finally:
        restart_worker(vllm_stack, worker_id)
