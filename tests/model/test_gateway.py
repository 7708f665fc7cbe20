"""Gateway behaviour over real gRPC servers (registry, scheduler, workers, gateway on port 0).

The workers run the ScriptedEngine test double: these tests are about leasing, streaming,
retries, cancellation and error mapping, not about inference (the vLLM tests cover that).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import struct_pb2

from llmesh.model.v1 import model_service_pb2 as pb
from tests.scripted_stack import MODEL, chat, engine


async def test_stream_chat_orders_chunks_and_reports_usage(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()})
    chunks = [
        c
        async for c in stack.gateway.StreamChatCompletion(
            chat(max_tokens=5, ignore_eos=True, stream_options=pb.StreamOptions(include_usage=True))
        )
    ]
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(not c.choices[0].delta.HasField("role") for c in content_chunks[1:])
    assert [c.choices[0].HasField("finish_reason") for c in content_chunks][-1] is True
    assert not any(c.choices[0].HasField("finish_reason") for c in content_chunks[:-1])
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    usage_chunk = chunks[-1]
    assert not usage_chunk.choices and usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 5
    assert await stack.active_leases() == 0


async def test_unary_chat_by_alias(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()})
    request = chat(max_completion_tokens=4, ignore_eos=True)
    request.model = "sm"
    response = await stack.gateway.CreateChatCompletion(request)
    assert response.object == "chat.completion" and response.model == MODEL.name
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 4


async def test_text_completion_with_echo(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()})
    response = await stack.gateway.CreateCompletion(
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
    stack = await stack_factory({"w0": engine()})
    for call in (
        stack.gateway.CreateChatCompletion(request_),
        _drain(stack.gateway.StreamChatCompletion(request_)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == code
        assert words in (info.value.details() or "")
    assert await stack.active_leases() == 0


async def _drain(call) -> list:
    return [m async for m in call]


async def test_worker_failing_before_first_token_is_retried_elsewhere(stack_factory) -> None:
    broken, healthy = engine(fail_after=0), engine()
    stack = await stack_factory({"broken": broken, "healthy": healthy})
    for _ in range(3):  # whichever worker the scheduler picks first, the request succeeds
        response = await stack.gateway.CreateChatCompletion(chat(max_tokens=3, ignore_eos=True))
        assert response.usage.completion_tokens == 3
    assert healthy.completed
    assert await stack.active_leases() == 0


async def test_failure_mid_stream_reaches_the_client(stack_factory) -> None:
    stack = await stack_factory({"w0": engine(fail_after=2)})
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for chunk in stack.gateway.StreamChatCompletion(chat(max_tokens=10, ignore_eos=True)):
            received.append(chunk)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert received[0].choices  # tokens arrived before the failure
    assert received[-1].HasField("error") and received[-1].error.code == "UNAVAILABLE"
    assert "mid-stream" in received[-1].error.message
    assert await stack.active_leases() == 0


async def test_client_cancel_aborts_engine_and_releases_lease(stack_factory) -> None:
    slow = engine(tokens_per_second=50)
    stack = await stack_factory({"w0": slow})
    call = stack.gateway.StreamChatCompletion(chat(max_tokens=60, ignore_eos=True))
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 2:
            break
    call.cancel()
    for _ in range(100):
        if slow.aborted and await stack.active_leases() == 0:
            break
        await asyncio.sleep(0.02)
    assert len(slow.aborted) == 1 and not slow.completed
    assert await stack.active_leases() == 0


async def test_no_capacity_is_resource_exhausted_with_retry_hint(stack_factory) -> None:
    slow = engine(tokens_per_second=20)
    stack = await stack_factory({"w0": slow}, max_queue_depth=0, max_queue_wait=0.2)
    # MODEL.max_num_seqs == 2 leases per worker: hold both, then ask for a third.
    holders = [stack.gateway.StreamChatCompletion(chat(max_tokens=60, ignore_eos=True)) for _ in range(2)]
    for h in holders:
        await h.read()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.CreateChatCompletion(chat(max_tokens=3))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry" in (info.value.details() or "").lower()
    assert any(k == "retry-after-ms" for k, _ in info.value.trailing_metadata() or ())
    for h in holders:
        h.cancel()


async def test_list_models_is_openai_shaped(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()})
    listing = await stack.gateway.ListModels(pb.ListModelsRequest())
    assert listing.object == "list"
    card = next(m for m in listing.data if m.id == MODEL.name)
    assert card.object == "model" and card.ready_workers == 1 and "sm" in card.aliases


async def test_tokenize_and_detokenize_round_trip_on_a_worker(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()})
    tokens = await stack.gateway.Tokenize(pb.TokenizeRequest(model="sm", prompt="tok3 tok4"))
    assert tokens.count == len(tokens.tokens) > 0 and tokens.max_model_len == MODEL.max_model_len
    chat_tokens = await stack.gateway.Tokenize(
        pb.TokenizeRequest(model=MODEL.name, messages=chat("hi").messages)
    )
    assert chat_tokens.count > 0
    text = await stack.gateway.Detokenize(pb.DetokenizeRequest(model=MODEL.name, tokens=tokens.tokens))
    assert text.prompt
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.Tokenize(pb.TokenizeRequest(model=MODEL.name))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await stack.active_leases() == 0
