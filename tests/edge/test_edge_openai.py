"""The official OpenAI SDK, unmodified, against Envoy in front of the gateway stand-in.

The stand-in answers ModelService with OpenAI-shaped messages (model "tiny"; "missing" is
NOT_FOUND, "busy" RESOURCE_EXHAUSTED, "fail-mid-stream" fails after two chunks), so these tests
pin what the edge itself contributes: stream routing, JSON printing, SSE framing, error shapes.
"""

from __future__ import annotations

import openai
import pytest

from llmesh.edge import EnvoyProcess

pytestmark = pytest.mark.envoy

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def client(edge: EnvoyProcess) -> openai.AsyncOpenAI:
    # The async client: the stand-ins run on this test's event loop, a blocking client would stall them.
    return openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="test-key", max_retries=0, timeout=30)


async def test_list_models(edge: EnvoyProcess) -> None:
    async with client(edge) as sdk:
        models = await sdk.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model"
    assert isinstance(models.data[0].created, int)


async def test_chat(edge: EnvoyProcess) -> None:
    async with client(edge) as sdk:
        completion = await sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == 6


async def test_streaming_chat(edge: EnvoyProcess) -> None:
    async with client(edge) as sdk:
        stream = await sdk.chat.completions.create(
            model="tiny", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].delta.role is None
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


async def test_unknown_model_is_not_found(edge: EnvoyProcess) -> None:
    async with client(edge) as sdk:
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.chat.completions.create(model="missing", messages=MESSAGES)
        assert "model 'missing' not found" in caught.value.message
        assert caught.value.code == "NOT_FOUND"
        assert caught.value.type == "not_found_error"
        # A stream that fails before its first chunk fails the same way.
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="missing", messages=MESSAGES, stream=True)


async def test_no_capacity_is_a_rate_limit(edge: EnvoyProcess) -> None:
    async with client(edge) as sdk:
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(model="busy", messages=MESSAGES)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after-ms"] == "2000"


async def test_failure_mid_stream_reaches_the_client(edge: EnvoyProcess) -> None:
    received = []
    async with client(edge) as sdk:
        stream = await sdk.chat.completions.create(model="fail-mid-stream", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError, match="failed mid-stream"):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
    assert received == ["Hel", "lo"]


async def test_bad_request_is_a_bad_request_error(edge: EnvoyProcess) -> None:
    async with client(edge) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.chat.completions.create(model="tiny", messages=MESSAGES, temperature="hot")  # type: ignore[arg-type]
    assert caught.value.type == "invalid_request_error"
