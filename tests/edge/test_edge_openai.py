"""The official OpenAI SDK, unmodified, against the edge on the real token path.

`stack_factory(..., edge=True)` runs the real registry, scheduler (endpoint picker), auth and
workers (ScriptedEngine test double) behind a real Envoy. These tests pin what OpenAI clients see:
the catalog, unary and streaming chat (sync and async clients), streams ending cleanly, and the
SDK's exception for each failure (unknown model, no capacity, failure mid-stream, bad request).
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from llmesh.model.v1 import model_service_pb2 as pb
from tests.scripted_stack import MODEL, ScriptedStack, chat, engine, settled

pytestmark = pytest.mark.envoy

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def client(stack: ScriptedStack) -> openai.AsyncOpenAI:
    # The async client: the stack runs on this test's event loop, a blocking client would stall it.
    return openai.AsyncOpenAI(base_url=f"{stack.envoy.url}/v1", api_key="test-key", max_retries=0, timeout=30)


async def test_list_models(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    async with client(stack) as sdk:
        models = await sdk.models.list()
        assert [m.id for m in models.data] == [MODEL.name]
        assert models.data[0].object == "model"
        assert isinstance(models.data[0].created, int)
        model = await sdk.models.retrieve("sm")  # by alias
    assert model.id == MODEL.name


async def test_chat(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    async with client(stack) as sdk:
        completion = await sdk.chat.completions.create(model="sm", messages=MESSAGES, max_tokens=4)
    assert completion.object == "chat.completion"
    assert completion.model == MODEL.name
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 4
    await settled(stack)


async def test_chat_with_the_sync_client(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)

    def call() -> openai.types.chat.ChatCompletion:
        # In a thread: the in-process stack keeps serving on the event loop meanwhile.
        with openai.OpenAI(base_url=f"{stack.envoy.url}/v1", api_key="k", max_retries=0, timeout=30) as sdk:
            return sdk.chat.completions.create(model=MODEL.name, messages=MESSAGES, max_tokens=3)

    completion = await asyncio.to_thread(call)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    await settled(stack)


async def test_streaming_chat(stack_factory) -> None:
    worker = engine()
    stack = await stack_factory({"w0": worker}, edge=True)
    async with client(stack) as sdk:
        unary = await sdk.chat.completions.create(model="sm", messages=MESSAGES, max_tokens=4)
        stream = await sdk.chat.completions.create(
            model="sm", messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        # The iteration ends on `data: [DONE]`, cleanly, with no error.
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].delta.role is None
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    await settled(stack)  # the picker saw the stream end and released its lease
    assert len(worker.completed) == 2 and not worker.aborted


async def test_unknown_model_is_not_found(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    async with client(stack) as sdk:
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)
        assert "no-such-model" in caught.value.message
        assert caught.value.code == "NOT_FOUND"
        assert caught.value.type == "not_found_error"
        # A stream that fails before its first chunk fails the same way.
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="no-such-model", messages=MESSAGES, stream=True)
    await settled(stack)


async def test_no_capacity_is_a_rate_limit(stack_factory) -> None:
    stack = await stack_factory(
        {"w0": engine(tokens_per_second=20)}, max_queue_depth=0, max_queue_wait=0.2, edge=True
    )
    # MODEL.max_num_seqs == 2 leases per worker: hold both, then ask for a third.
    holders = [stack.models.StreamChatCompletion(chat(max_tokens=60)) for _ in range(2)]
    try:
        for holder in holders:
            await holder.read()
        async with client(stack) as sdk:
            with pytest.raises(openai.RateLimitError) as caught:
                await sdk.chat.completions.create(model="sm", messages=MESSAGES, max_tokens=3)
        assert caught.value.status_code == 429
        assert caught.value.type == "rate_limit_error"
        headers = caught.value.response.headers
        assert int(headers["retry-after-ms"]) > 0 and int(headers["retry-after"]) >= 1
    finally:
        for holder in holders:
            holder.cancel()
    await settled(stack)


async def test_failure_mid_stream_reaches_the_client(stack_factory) -> None:
    stack = await stack_factory({"w0": engine(fail_after=2)}, edge=True)
    received: list[str] = []
    async with client(stack) as sdk:
        stream = await sdk.chat.completions.create(model="sm", messages=MESSAGES, max_tokens=10, stream=True)
        with pytest.raises(openai.APIError, match="after 2 tokens"):
            async for chunk in stream:
                if chunk.choices:
                    received.append(chunk.choices[0].delta.content or "")
    assert len([text for text in received if text]) == 2  # the tokens produced before the failure
    await settled(stack)


async def test_bad_request_is_a_bad_request_error(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    async with client(stack) as sdk:
        # Rejected by the transcoder: not JSON for the contract.
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.chat.completions.create(model="sm", messages=MESSAGES, temperature="hot")  # type: ignore[arg-type]
        assert caught.value.type == "invalid_request_error"
        # Rejected on the token path: more tokens than the model allows.
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.chat.completions.create(
                model="sm", messages=MESSAGES, max_tokens=MODEL.max_output_tokens + 1
            )
        assert caught.value.type == "invalid_request_error"
        assert caught.value.code == "INVALID_ARGUMENT"
        assert f"at most {MODEL.max_output_tokens}" in caught.value.message
    await settled(stack)


async def test_grpc_and_rest_clients_share_the_token_path(stack_factory) -> None:
    """A native gRPC client through the same edge gets the same tokens as the SDK."""
    stack = await stack_factory({"w0": engine()}, edge=True)
    grpc_reply = await stack.models.CreateChatCompletion(chat("hi", max_tokens=3))
    async with client(stack) as sdk:
        completion = await sdk.chat.completions.create(model=MODEL.name, messages=MESSAGES, max_tokens=3)
    assert completion.choices[0].message.content == grpc_reply.choices[0].message.content
    assert isinstance(grpc_reply, pb.CreateChatCompletionResponse)
    await settled(stack)
