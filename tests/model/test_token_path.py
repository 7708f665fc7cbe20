"""The token path over real servers: Envoy → endpoint picker (scheduler, ext_proc) → worker.

Registry, scheduler, auth and workers run in-process on port 0, a real Envoy in front with the
edge config `llmesh up` uses. The workers run the ScriptedEngine test double: these tests are about
picking, leasing, streaming, retries, cancellation and error mapping, not about inference (the
vLLM tests cover that).
"""

from __future__ import annotations

import asyncio
import itertools
import time

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2

from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.registry.v1 import registry_service_pb2 as registry_pb
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from tests.scripted_stack import MODEL, ScriptedStack, chat, engine

pytestmark = pytest.mark.envoy


async def settled(stack: ScriptedStack, timeout_s: float = 10.0) -> None:
    """Until every lease is released. The picker releases when Envoy closes its ext_proc stream,
    which happens just after the client saw the response's end: poll, do not assume."""
    deadline = time.monotonic() + timeout_s
    while await stack.active_leases():
        assert time.monotonic() < deadline, "leases were not released"
        await asyncio.sleep(0.02)


async def granted(stack: ScriptedStack) -> int:
    status = await stack.scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
    return status.leases_granted


def http(stack: ScriptedStack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.envoy.url, timeout=30)


async def test_stream_chat_orders_chunks_and_reports_usage(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    chunks = [
        c
        async for c in stack.models.StreamChatCompletion(
            chat(max_tokens=5, ignore_eos=True, stream_options=pb.StreamOptions(include_usage=True))
        )
    ]
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(not c.choices[0].delta.HasField("role") for c in content_chunks[1:])
    assert not any(c.choices[0].HasField("finish_reason") for c in content_chunks[:-1])
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    usage_chunk = chunks[-1]
    assert not usage_chunk.choices and usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 5
    assert await granted(stack) == 1  # the picker leased it
    await settled(stack)


async def test_sse_stream_arrives_token_by_token_and_ends_with_done(stack_factory) -> None:
    stack = await stack_factory({"w0": engine(tokens_per_second=20)}, edge=True)
    body = {"model": "sm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    body |= {"stream": True, "ignore_eos": True}
    frames: list[tuple[float, str]] = []
    async with http(stack) as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        buffer = ""
        async for text in response.aiter_text():
            buffer += text
            while "\n\n" in buffer:
                frame, buffer = buffer.split("\n\n", 1)
                frames.append((time.monotonic(), frame))
    assert frames[-1][1] == "data: [DONE]"
    chunks = [f for f in frames if f[1] != "data: [DONE]"]
    assert len(chunks) == 6
    # 20 tokens/s: each chunk comes on its own, ~50 ms apart, not in one burst at the end.
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(chunks)]
    assert min(gaps) > 0.02, gaps
    # OpenAI's delta fields only: no empty tool_calls, no empty system_fingerprint.
    assert '"tool_calls"' not in chunks[1][1] and "system_fingerprint" not in chunks[1][1]
    assert '"index":0' in chunks[1][1]
    await settled(stack)


async def test_unary_chat_by_alias(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    request = chat(max_completion_tokens=4, ignore_eos=True)
    request.model = "sm"
    response = await stack.models.CreateChatCompletion(request)
    assert response.object == "chat.completion" and response.model == MODEL.name
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 4
    await settled(stack)


async def test_text_completion_with_echo(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    response = await stack.models.CreateCompletion(
        pb.CreateCompletionRequest(
            model=MODEL.name,
            prompt=struct_pb2.Value(string_value="Once upon"),
            max_tokens=3,
            echo=True,
            ignore_eos=True,
        )
    )
    assert response.choices[0].text.startswith("Once upon")
    assert response.usage.completion_tokens == 3
    await settled(stack)


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (
            pb.CreateChatCompletionRequest(model="no-such-model", messages=chat().messages),
            grpc.StatusCode.NOT_FOUND,
            "no-such-model",
        ),
        (chat(max_tokens=65), grpc.StatusCode.INVALID_ARGUMENT, "at most 64"),
        (
            pb.CreateChatCompletionRequest(model=MODEL.name),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages is empty",
        ),
        (
            pb.CreateChatCompletionRequest(messages=chat().messages),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model is required",
        ),
        (chat(temperature=5.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (chat(priority="urgent"), grpc.StatusCode.INVALID_ARGUMENT, "priority"),
    ],
)
async def test_bad_requests_get_clear_statuses(stack_factory, request_, code, words) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    for call in (
        stack.models.CreateChatCompletion(request_),
        _drain(stack.models.StreamChatCompletion(request_)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == code
        assert words in (info.value.details() or "")
    await settled(stack)


async def _drain(call) -> list:
    return [m async for m in call]


async def test_worker_failing_before_first_token_is_retried_elsewhere(stack_factory) -> None:
    broken, healthy = engine(fail_after=0), engine()
    stack = await stack_factory({"broken": broken, "healthy": healthy}, edge=True)
    for _ in range(4):  # whichever worker the picker leases first, the request succeeds
        response = await stack.models.CreateChatCompletion(chat(max_tokens=3, ignore_eos=True))
        assert response.usage.completion_tokens == 3
    assert len(healthy.completed) == 4
    await settled(stack)


async def test_failure_mid_stream_reaches_the_client(stack_factory) -> None:
    stack = await stack_factory({"w0": engine(fail_after=2)}, edge=True)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for chunk in stack.models.StreamChatCompletion(chat(max_tokens=10, ignore_eos=True)):
            received.append(chunk)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert received[0].choices  # tokens arrived before the failure
    assert received[-1].HasField("error") and received[-1].error.code == "UNAVAILABLE"
    assert "after 2 tokens" in received[-1].error.message
    await settled(stack)


async def test_client_cancel_aborts_engine_and_releases_lease(stack_factory) -> None:
    slow = engine(tokens_per_second=50)
    stack = await stack_factory({"w0": slow}, edge=True)
    call = stack.models.StreamChatCompletion(chat(max_tokens=60, ignore_eos=True))
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 2:
            break
    call.cancel()
    await settled(stack)
    deadline = time.monotonic() + 10
    while not slow.aborted:
        assert time.monotonic() < deadline, "the engine request was not aborted"
        await asyncio.sleep(0.02)
    assert len(slow.aborted) == 1 and not slow.completed


async def test_no_capacity_is_resource_exhausted_with_retry_hint(stack_factory) -> None:
    slow = engine(tokens_per_second=20)
    stack = await stack_factory({"w0": slow}, max_queue_depth=0, max_queue_wait=0.2, edge=True)
    # MODEL.max_num_seqs == 2 leases per worker: hold both, then ask for a third.
    holders = [stack.models.StreamChatCompletion(chat(max_tokens=60, ignore_eos=True)) for _ in range(2)]
    for h in holders:
        await h.read()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.models.CreateChatCompletion(chat(max_tokens=3))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry" in (info.value.details() or "").lower()
    assert any(k == "retry-after-ms" for k, _ in info.value.trailing_metadata() or ())
    async with http(stack) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
    assert response.status_code == 429 and response.headers.get("retry-after")
    assert response.json()["error"]["type"] == "rate_limit_error"
    for h in holders:
        h.cancel()
    await settled(stack)


async def test_a_full_engine_queue_does_not_eject_the_worker(stack_factory) -> None:
    # The pool allows 2 leases but the engine runs 1 and refuses the rest (a full vLLM queue).
    busy = engine(tokens_per_second=20, max_running=1, reject_when_full=True)
    stack = await stack_factory({"w0": busy}, edge=True)
    holder = stack.models.StreamChatCompletion(chat(max_tokens=40, ignore_eos=True))
    await holder.read()
    for _ in range(4):  # more than the outlier detector's threshold of consecutive failures
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.models.CreateChatCompletion(chat(max_tokens=2))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    holder.cancel()
    await settled(stack)
    response = await stack.models.CreateChatCompletion(chat(max_tokens=2, ignore_eos=True))
    assert response.usage.completion_tokens == 2
    status = await stack.scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
    assert not status.workers[0].ejected
    async with httpx.AsyncClient(timeout=5) as client:
        stats = (await client.get(f"http://127.0.0.1:{stack.envoy.admin_port}/stats")).text
    assert "cluster.llmesh_workers.outlier_detection.ejections_total: 0" in stats


async def test_same_client_request_id_twice_gets_two_leases(stack_factory) -> None:
    slow = engine(tokens_per_second=20)
    stack = await stack_factory({"w0": slow}, edge=True)
    metadata = (("x-request-id", "same-id"), ("x-llmesh-request-id", "forged"))
    calls = [
        stack.models.StreamChatCompletion(chat(max_tokens=4, ignore_eos=True), metadata=metadata)
        for _ in range(2)
    ]
    results = await asyncio.gather(*(_drain(c) for c in calls))
    ids = {chunks[0].id for chunks in results}
    assert len(ids) == 2 and not any("forged" in i or "same-id" in i for i in ids)
    assert all(len([c for c in chunks if c.choices]) == 4 for chunks in results)
    assert len(slow.completed) == 2 and await granted(stack) == 2
    for call in calls:
        assert ("x-request-id", "same-id") in tuple(await call.initial_metadata())
    await settled(stack)


async def test_internal_rpcs_are_not_reachable_on_the_public_listener(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.envoy.port}")
    try:
        registry = registry_grpc.RegistryServiceStub(channel)
        scheduler = sched_grpc.SchedulerServiceStub(channel)
        for call in (
            registry.RegisterWorker(
                registry_pb.RegisterWorkerRequest(
                    worker=registry_pb.Worker(worker_id="rogue", address="127.0.0.1:1", models=[MODEL.name])
                )
            ),
            registry.Heartbeat(registry_pb.HeartbeatRequest(worker_id="w0")),
            registry.DeregisterWorker(registry_pb.DeregisterWorkerRequest(worker_id="w0")),
            scheduler.Acquire(sched_pb.AcquireRequest(model=MODEL.name)),
            scheduler.Release(sched_pb.ReleaseRequest(lease_id="x")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Public ones still pass.
        status = await scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
        assert [w.worker_id for w in status.workers] == ["w0"]
    finally:
        await channel.close()
    assert await granted(stack) == 0


async def test_list_models_comes_from_the_registry(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    listing = await stack.models.ListModels(pb.ListModelsRequest())
    assert listing.object == "list"
    card = next(m for m in listing.data if m.id == MODEL.name)
    assert card.object == "model" and card.ready_workers == 1 and "sm" in card.aliases
    assert await granted(stack) == 0  # catalog reads never take a lease


async def test_tokenize_and_detokenize_round_trip_on_a_worker(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    tokens = await stack.models.Tokenize(pb.TokenizeRequest(model="sm", prompt="tok3 tok4"))
    assert tokens.count == len(tokens.tokens) > 0 and tokens.max_model_len == MODEL.max_model_len
    chat_tokens = await stack.models.Tokenize(
        pb.TokenizeRequest(model=MODEL.name, messages=chat("hi").messages)
    )
    assert chat_tokens.count > 0
    text = await stack.models.Detokenize(pb.DetokenizeRequest(model=MODEL.name, tokens=tokens.tokens))
    assert text.prompt
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.models.Tokenize(pb.TokenizeRequest(model=MODEL.name))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await settled(stack)
