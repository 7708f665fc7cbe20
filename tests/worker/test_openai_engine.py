"""OpenAIEngine against a real OpenAI-compatible server (vLLM's, on the tiny model, started here),
and against OpenAIWireDouble (a TEST DOUBLE) for the faults a real server will not produce on demand."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmesh.common.config import ModelConfig
from llmesh.common.errors import DependencyDown, InvalidRequest, NotFound, OverCapacity
from llmesh.worker.engine import ChatMessage, GenerationChunk, GenerationInput, GenerationRequest, Sampling
from llmesh.worker.engine_factory import build_engine
from llmesh.worker.openai_engine import OpenAIEngine, OpenAISettings
from llmesh.worker.sse import SseEvent, encode_event, read_events
from tests.vllm_openai_server import API_KEY, SERVED, running_requests
from tests.worker.openai_wire_double import OpenAIWireDouble


@pytest.fixture(scope="module")
def vllm_server(vllm_openai_server: str) -> str:
    return vllm_openai_server


@contextlib.asynccontextmanager
async def engine_for(base_url: str, **overrides: object) -> AsyncIterator[OpenAIEngine]:
    settings = {"served_name": SERVED, "base_url": base_url, "api_key": API_KEY, **overrides}
    engine = OpenAIEngine(OpenAISettings(**settings))  # type: ignore[arg-type]
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


def chat(request_id: str, text: str = "Tell me about the market.", **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        request_id,
        SERVED,
        GenerationInput.messages([ChatMessage("system", "Be brief."), ChatMessage("user", text)]),
        Sampling(**sampling),  # type: ignore[arg-type]
    )


async def collect(engine: OpenAIEngine, req: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in engine.generate(req)]


# --- against the real server ---------------------------------------------------------------------


async def test_chat_streams_deltas_with_the_upstreams_usage(vllm_server: str) -> None:
    model = ModelConfig(name=SERVED, engine="openai", base_url=vllm_server, api_key_env="TINY_UPSTREAM_KEY")
    engine = build_engine(model, env={"TINY_UPSTREAM_KEY": API_KEY})
    await engine.start()
    try:
        chunks = [
            c async for c in engine.generate(chat("c1", max_tokens=16, ignore_eos=True, temperature=0.0))
        ]
    finally:
        await engine.shutdown()
    assert len(chunks) > 2  # streamed, not one blob
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts)
    last = chunks[-1]
    assert last.completion_tokens == 16 and last.prompt_tokens > 5  # the upstream's usage
    assert last.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks)


async def test_prompts_with_a_local_tokenizer_count_like_the_upstream(
    vllm_server: str, tiny_model_dir: Path
) -> None:
    async with engine_for(vllm_server, tokenizer=str(tiny_model_dir), max_model_len=2048) as engine:
        text = GenerationRequest("t1", SERVED, GenerationInput.text("The morning was cold and clear."))
        chunks = await collect(engine, text)
        # The local count (first chunk) matches the upstream's (last chunk).
        assert chunks[0].prompt_tokens == chunks[-1].prompt_tokens > 5
        ids = await engine.tokenize(SERVED, GenerationInput.text("The morning was cold"), False)
        assert await engine.detokenize(SERVED, ids) == "The morning was cold"
        by_ids = GenerationRequest("t2", SERVED, GenerationInput.tokens(ids), Sampling(max_tokens=4))
        assert (await collect(engine, by_ids))[-1].prompt_tokens == len(ids)
        # The context check happens here, before the request leaves.
        with pytest.raises(InvalidRequest, match="lower max_tokens"):
            await collect(engine, chat("t3", max_tokens=2047))


async def test_concurrent_streams_share_one_client(vllm_server: str) -> None:
    async with engine_for(vllm_server) as engine:
        client = engine._client
        results = await asyncio.gather(
            *(collect(engine, chat(f"p{i}", max_tokens=8, ignore_eos=True)) for i in range(4))
        )
        assert [r[-1].completion_tokens for r in results] == [8] * 4
        assert engine._client is client and engine.load().running == 0


async def test_cancel_stops_the_upstream_request(vllm_server: str) -> None:
    async with engine_for(vllm_server) as engine:
        stream = engine.generate(chat("x1", max_tokens=1500, ignore_eos=True))
        async with contextlib.aclosing(stream):
            await anext(stream)
            await anext(stream)
            assert running_requests(vllm_server) == 1
        assert engine.load().running == 0
        for _ in range(50):  # the server notices the closed connection and aborts
            if running_requests(vllm_server) == 0:
                break
            await asyncio.sleep(0.1)
        assert running_requests(vllm_server) == 0


async def test_real_upstream_errors_map_to_domain_errors(vllm_server: str) -> None:
    async with engine_for(vllm_server, api_key="sk-wrong") as engine:
        with pytest.raises(DependencyDown, match="refused this worker's credentials") as raised:
            await collect(engine, chat("e1"))
        assert "sk-wrong" not in str(raised.value)
    async with engine_for(vllm_server, upstream_model="no-such-model") as engine:
        with pytest.raises(NotFound, match="no-such-model"):
            await collect(engine, chat("e2"))
    async with engine_for(vllm_server) as engine:  # no local tokenizer: the upstream checks the context
        with pytest.raises(InvalidRequest, match="HTTP 400"):
            await collect(engine, chat("e3", max_tokens=4000))


# --- faults, against the double -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def double_engine(
    *script: int | str, **overrides: object
) -> AsyncIterator[tuple[OpenAIWireDouble, OpenAIEngine]]:
    double = await OpenAIWireDouble(*script).start()
    try:
        async with engine_for(double.url, retry_backoff_s=0.01, **overrides) as engine:
            yield double, engine
    finally:
        await double.stop()


async def test_retries_before_the_first_byte() -> None:
    async with double_engine(503, 502, "ok") as (double, engine):
        chunks = await collect(engine, chat("f1"))
        assert len(double.requests) == 3
        assert "".join(c.choices[0].text for c in chunks) == "a b c"
        assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (7, 3)
        body = double.requests[-1]
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    async with double_engine(503) as (double, engine):
        with pytest.raises(DependencyDown, match="HTTP 503"):
            await collect(engine, chat("f2"))
        assert len(double.requests) == 3  # one try and max_retries=2 more


async def test_never_retries_once_the_answer_streams() -> None:
    async with double_engine("break", "ok") as (double, engine):
        seen: list[GenerationChunk] = []
        with pytest.raises(DependencyDown, match="closed the stream before choices"):
            async for chunk in engine.generate(chat("f3")):
                seen.append(chunk)
        assert "".join(c.choices[0].text for c in seen) == "a b" and len(double.requests) == 1
    async with double_engine("hang", "ok", timeout_s=0.5) as (double, engine):
        with pytest.raises(DependencyDown, match="ReadTimeout"):
            await collect(engine, chat("f4"))
        assert len(double.requests) == 1


async def test_status_mapping() -> None:
    async with double_engine(429, "ok") as (double, engine):
        with pytest.raises(OverCapacity, match="retry in 3s") as raised:
            await collect(engine, chat("f5"))
        assert raised.value.retry_after_s == 3 and len(double.requests) == 1  # type: ignore[attr-defined]
    for status, error in (
        (400, InvalidRequest),
        (403, DependencyDown),
        (404, NotFound),
        (500, DependencyDown),
    ):
        async with double_engine(status, max_retries=0) as (_, engine):
            with pytest.raises(error, match=f"HTTP {status}"):
                await collect(engine, chat(f"s{status}"))
    async with engine_for("http://127.0.0.1:9/v1", retry_backoff_s=0.01) as engine:
        with pytest.raises(DependencyDown, match="unreachable after 3 attempts"):
            await collect(engine, chat("f6"))


async def test_usage_counted_locally_when_the_upstream_reports_none(tiny_model_dir: Path) -> None:
    async with double_engine("no-usage") as (_, engine):
        last = (await collect(engine, chat("u1")))[-1]
        assert (last.prompt_tokens, last.completion_tokens) == (0, 3)  # one per delta, prompt unknown
    async with double_engine("no-usage", tokenizer=str(tiny_model_dir)) as (_, engine):
        last = (await collect(engine, chat("u2")))[-1]
        local = engine._tokenizer
        assert local is not None
        assert last.completion_tokens == local.count("a b c")
        assert last.prompt_tokens == len(local.encode(chat("u2").input)) > 0


async def test_key_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with double_engine(503, "ok") as (_, engine):
        await collect(engine, chat("k1"))
    assert caplog.records and API_KEY not in caplog.text
    assert API_KEY not in repr(engine.settings)


async def test_without_a_tokenizer_tokenize_says_why() -> None:
    async with double_engine() as (_, engine):
        with pytest.raises(InvalidRequest, match=r"models\[\]\.tokenizer"):
            await engine.tokenize(SERVED, GenerationInput.text("hi"))
        with pytest.raises(InvalidRequest, match="does not support logprobs"):
            await collect(engine, chat("l1", logprobs=True))


def test_factory_needs_a_base_url() -> None:
    with pytest.raises(InvalidRequest, match="no base_url"):
        build_engine(ModelConfig(name="m", engine="openai"))


async def test_sse_reader_follows_the_event_stream_format() -> None:
    wire = (
        b": keep-alive comment\n\n"
        + encode_event({"a": 1})
        + encode_event("line one\nline two", "note")
        + b"data:no-space\n\ndata: unterminated"
    ).decode()

    async def lines() -> AsyncIterator[str]:
        for line in wire.split("\n"):
            yield line

    events = [e async for e in read_events(lines())]
    assert events == [
        SseEvent("message", '{"a": 1}'),
        SseEvent("note", "line one\nline two"),
        SseEvent("message", "no-space"),
        SseEvent("message", "unterminated"),
    ]
    assert events[0].json() == {"a": 1}
