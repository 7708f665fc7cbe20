"""AnthropicEngine (official SDK) against AnthropicWireDouble, a local TEST DOUBLE of the Messages API
wire format: no real Anthropic endpoint is reachable from tests."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator

import pytest

from llmesh.common.config import ModelConfig
from llmesh.common.errors import DependencyDown, InvalidRequest, NotFound, OverCapacity
from llmesh.worker.anthropic_engine import AnthropicEngine, AnthropicSettings
from llmesh.worker.engine import ChatMessage, GenerationChunk, GenerationInput, GenerationRequest, Sampling
from llmesh.worker.engine_factory import build_engine
from tests.support import require
from tests.worker.anthropic_wire_double import AnthropicWireDouble


@pytest.fixture
async def double() -> AsyncIterator[AnthropicWireDouble]:
    require(importlib.util.find_spec("anthropic") is not None, "pip install -e '.[anthropic]'")
    server = await AnthropicWireDouble().start()
    yield server
    await server.stop()


async def started(
    double: AnthropicWireDouble, upstream: str = "claude-double", **kw: object
) -> AnthropicEngine:
    settings = AnthropicSettings(
        served_name="claude",
        upstream_model=upstream,
        base_url=double.url,
        api_key=str(kw.pop("api_key", double.api_key)),
        max_retries=int(kw.pop("max_retries", 0)),  # type: ignore[call-overload]
        **kw,  # type: ignore[arg-type]
    )
    engine = AnthropicEngine(settings)
    await engine.start()
    return engine


def chat_request(*messages: ChatMessage, **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"r-{id(messages)}",
        model="claude",
        input=GenerationInput.messages(messages),
        sampling=Sampling(**sampling),  # type: ignore[arg-type]
    )


async def collect(engine: AnthropicEngine, req: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in engine.generate(req)]


async def test_chat_maps_to_messages_api_and_streams_deltas_with_usage(double: AnthropicWireDouble) -> None:
    engine = await started(double)
    req = chat_request(
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hello there"),
        ChatMessage("user", "and again"),
        ChatMessage("assistant", "Hi"),
        ChatMessage("user", "Name five words"),
        max_tokens=50,
        temperature=0.5,
        top_p=0.9,
        top_k=5,
    )
    chunks = await collect(engine, req)
    sent = double.requests[-1]
    assert sent["system"] == "Be brief."
    assert sent["messages"] == [
        {"role": "user", "content": "Hello there\n\nand again"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Name five words"},
    ]
    assert (sent["model"], sent["max_tokens"], sent["temperature"], sent["top_p"], sent["top_k"]) == (
        "claude-double",
        50,
        0.5,
        0.9,
        5,
    )
    assert "".join(c.choices[0].text for c in chunks) == " w0 w1 w2 w3 w4"
    assert len(chunks) == 6  # five deltas, streamed one by one, then the end
    assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4, 5, 5]
    assert [c.finished for c in chunks] == [False] * 5 + [True]
    last = chunks[-1]
    assert (last.prompt_tokens, last.completion_tokens) == (2 + 4 + 1 + 3, 5)
    assert (last.choices[0].finish_reason, last.choices[0].stop_reason) == ("stop", None)
    await engine.shutdown()


async def test_max_tokens_and_stop_sequences(double: AnthropicWireDouble) -> None:
    engine = await started(double)
    capped = await collect(engine, chat_request(ChatMessage("user", "hi"), max_tokens=2))
    assert capped[-1].choices[0].finish_reason == "length" and capped[-1].completion_tokens == 2
    stopped = await collect(engine, chat_request(ChatMessage("user", "hi"), stop=("w3",)))
    assert double.requests[-1]["stop_sequences"] == ["w3"]
    assert "".join(c.choices[0].text for c in stopped) == " w0 w1 w2"
    assert (stopped[-1].choices[0].finish_reason, stopped[-1].choices[0].stop_reason) == ("stop", "w3")
    # Without max_tokens the model's max_output_tokens goes (Anthropic requires the field).
    assert double.requests[-1]["max_tokens"] == 1024
    await engine.shutdown()


async def test_text_prompt_becomes_one_user_turn(double: AnthropicWireDouble) -> None:
    engine = await started(double)
    req = GenerationRequest("r-text", "claude", GenerationInput.text("The capital of France is"))
    chunks = await collect(engine, req)
    assert double.requests[-1]["messages"] == [{"role": "user", "content": "The capital of France is"}]
    assert chunks[-1].finished
    await engine.shutdown()


async def test_cancel_closes_the_upstream_stream(double: AnthropicWireDouble) -> None:
    engine = await started(double, upstream="slow")
    stream = engine.generate(chat_request(ChatMessage("user", "count")))
    async with contextlib.aclosing(stream):
        seen = [await anext(stream), await anext(stream)]
    assert len(seen) == 2 and engine.load().running == 0
    for _ in range(100):
        if double.closed_early:
            break
        await asyncio.sleep(0.02)
    assert double.closed_early == 1

    # A cancelled task closes it the same way.
    async def consume() -> None:
        async for _ in engine.generate(chat_request(ChatMessage("user", "count again"))):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if double.closed_early == 2:
            break
        await asyncio.sleep(0.02)
    assert double.closed_early == 2 and engine.load().running == 0
    await engine.shutdown()


@pytest.mark.parametrize(
    ("upstream", "error", "words"),
    [
        ("missing", NotFound, "claude-double"),
        ("busy", OverCapacity, "retry in 7s"),
        ("broken", DependencyDown, "HTTP 500"),
    ],
)
async def test_upstream_errors_map_to_domain_errors(
    double: AnthropicWireDouble, upstream: str, error: type[Exception], words: str
) -> None:
    engine = await started(double, upstream=upstream)
    with pytest.raises(error) as raised:
        await collect(engine, chat_request(ChatMessage("user", "hi")))
    if upstream == "missing":
        assert "upstream_model" in str(raised.value)
    else:
        assert words in str(raised.value)
    if upstream == "busy":
        assert raised.value.retry_after_s == 7  # type: ignore[attr-defined]
    await engine.shutdown()


async def test_bad_request_and_bad_key(double: AnthropicWireDouble) -> None:
    engine = await started(double)
    with pytest.raises(InvalidRequest, match="temperature: must be at most 1"):
        await collect(engine, chat_request(ChatMessage("user", "hi"), temperature=1.5))
    await engine.shutdown()
    wrong = await started(double, api_key="wrong-key")
    with pytest.raises(DependencyDown, match="refused this worker's credentials") as raised:
        await collect(wrong, chat_request(ChatMessage("user", "hi")))
    assert "wrong-key" not in str(raised.value)
    await wrong.shutdown()


async def test_error_event_mid_stream_is_dependency_down(double: AnthropicWireDouble) -> None:
    engine = await started(double, upstream="overloaded-midstream")
    got: list[GenerationChunk] = []
    with pytest.raises(DependencyDown, match="after 2 text deltas"):
        async for chunk in engine.generate(chat_request(ChatMessage("user", "hi"))):
            got.append(chunk)
    assert len(got) == 2
    await engine.shutdown()


async def test_unreachable_upstream_is_dependency_down() -> None:
    engine = AnthropicEngine(
        AnthropicSettings(
            "claude", "claude-double", base_url="http://127.0.0.1:9", api_key="k", max_retries=0
        )
    )
    await engine.start()
    with pytest.raises(DependencyDown, match="unreachable"):
        await collect(engine, chat_request(ChatMessage("user", "hi")))
    await engine.shutdown()


async def test_refuses_what_the_messages_api_cannot_do(double: AnthropicWireDouble) -> None:
    engine = await started(double)
    with pytest.raises(InvalidRequest, match="does not support seed, n"):
        await collect(engine, chat_request(ChatMessage("user", "hi"), n=2, seed=1))
    with pytest.raises(InvalidRequest, match="role 'tool'"):
        await collect(engine, chat_request(ChatMessage("tool", "42")))
    with pytest.raises(InvalidRequest, match="does not expose token ids"):
        await engine.tokenize("claude", GenerationInput.text("hi"))
    with pytest.raises(InvalidRequest, match="not prompt token ids"):
        await collect(engine, GenerationRequest("r-ids", "claude", GenerationInput.tokens([1, 2])))
    # Neutral values are not refusals.
    assert (await collect(engine, chat_request(ChatMessage("user", "hi"), presence_penalty=0.0)))[-1].finished
    await engine.shutdown()


def test_factory_builds_it_with_the_key_from_the_named_variable() -> None:
    model = ModelConfig(
        name="claude", engine="anthropic", upstream_model="claude-x", base_url="http://h", api_key_env="K"
    )
    engine = build_engine(model, env={"K": "secret-value"})
    assert isinstance(engine, AnthropicEngine)
    assert engine.settings.api_key == "secret-value"
    assert "secret-value" not in repr(engine.settings)
    with pytest.raises(InvalidRequest, match=r"'K'.*is not set"):
        build_engine(model, env={})
    # Anthropic's conventional variable is only read for Anthropic's own endpoint.
    other = ModelConfig(name="c", engine="anthropic", base_url="http://elsewhere")
    assert build_engine(other, env={"ANTHROPIC_API_KEY": "a"}).settings.api_key == ""  # type: ignore[attr-defined]
    own = ModelConfig(name="c", engine="anthropic")
    assert build_engine(own, env={"ANTHROPIC_API_KEY": "a"}).settings.api_key == "a"  # type: ignore[attr-defined]


def test_unknown_engine_lists_the_choices() -> None:
    with pytest.raises(
        InvalidRequest, match="unknown engine 'tgi'; use one of vllm, vllm-embed, openai, anthropic, llamacpp"
    ):
        build_engine(ModelConfig(name="m", engine="tgi"))
