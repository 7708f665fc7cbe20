"""Fast tests of the scripted engine test double, and of the engine value objects it shares."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from llmesh.common.errors import DependencyDown, InvalidRequest, NotFound
from llmesh.worker.engine import (
    ChatMessage,
    Engine,
    GenerationChunk,
    GenerationInput,
    GenerationRequest,
    Sampling,
    StructuredSpec,
)
from llmesh.worker.scripted_engine import ScriptedEngine, ScriptedSettings


def request(rid: str = "r1", prompt: str = "hello there", **sampling: object) -> GenerationRequest:
    return GenerationRequest(rid, "scripted", GenerationInput.text(prompt), Sampling(**sampling))  # type: ignore[arg-type]


async def collect(engine: ScriptedEngine, req: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(req)]


def texts(chunks: list[GenerationChunk], n: int = 1) -> list[str]:
    out = [""] * n
    for chunk in chunks:
        for c in chunk.choices:
            out[c.index] += c.text
    return out


@pytest.fixture
async def engine() -> ScriptedEngine:
    e = ScriptedEngine()
    await e.start()
    return e


async def test_is_an_engine(engine: ScriptedEngine) -> None:
    assert isinstance(engine, Engine)
    assert [m.name for m in engine.models()] == ["scripted"]


async def test_max_tokens_and_usage(engine: ScriptedEngine) -> None:
    chunks = await collect(engine, request(max_tokens=5))
    assert texts(chunks) == ["tok0 tok1 tok2 tok3 tok4"]
    assert len(chunks) == 5  # one token per step, nothing held back
    last = chunks[-1]
    assert last.finished and last.completion_tokens == 5 and last.prompt_tokens == 2
    assert last.choices[0].finish_reason == "length"
    assert all(not c.finished for c in chunks[:-1])


async def test_n_choices(engine: ScriptedEngine) -> None:
    chunks = await collect(engine, request(max_tokens=3, n=3))
    assert texts(chunks, 3) == ["tok0 tok1 tok2"] * 3
    assert chunks[-1].completion_tokens == 9
    assert sorted(c.index for c in chunks[-1].choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in chunks[-1].choices)


async def test_stop_string_and_token(engine: ScriptedEngine) -> None:
    chunks = await collect(engine, request(max_tokens=10, stop=(" tok3",)))
    assert texts(chunks) == ["tok0 tok1 tok2"]
    assert (chunks[-1].choices[0].finish_reason, chunks[-1].choices[0].stop_reason) == ("stop", " tok3")

    chunks = await collect(engine, request(max_tokens=10, stop_token_ids=(2,)))
    assert chunks[-1].choices[0].stop_reason == "2" and chunks[-1].completion_tokens == 3


async def test_eos_and_ignore_eos() -> None:
    e = ScriptedEngine(ScriptedSettings(eos_after=2))
    await e.start()
    assert (await collect(e, request(max_tokens=8)))[-1].completion_tokens == 2
    assert (await collect(e, request(max_tokens=8, ignore_eos=True)))[-1].completion_tokens == 8
    # As in vLLM: the first min_tokens tokens cannot end the sequence, the next one can.
    assert (await collect(e, request(max_tokens=8, min_tokens=4)))[-1].completion_tokens == 5


async def test_logprobs(engine: ScriptedEngine) -> None:
    chunks = await collect(engine, request(max_tokens=2, logprobs=True, top_logprobs=3))
    lp = chunks[0].choices[0].logprobs[0]
    assert lp.token_id == chunks[0].choices[0].token_ids[0] and len(lp.top) == 3


async def test_cancel_decrements_running_and_aborts() -> None:
    e = ScriptedEngine(ScriptedSettings(tokens_per_second=200))
    await e.start()
    seen: list[GenerationChunk] = []
    two_seen = asyncio.Event()

    async def consume() -> None:
        async for chunk in e.generate(request("cancel-me", max_tokens=1000)):
            seen.append(chunk)
            if len(seen) == 2:
                two_seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(two_seen.wait(), 5)
    assert e.load().running == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert e.load().running == 0
    assert e.aborted == ["cancel-me"]


async def test_break_with_aclose_aborts(engine: ScriptedEngine) -> None:
    async with contextlib.aclosing(engine.generate(request("b", max_tokens=100))) as stream:
        async for chunk in stream:
            if chunk.completion_tokens >= 2:
                break
    assert engine.load().running == 0 and engine.aborted == ["b"]


async def test_capacity_queues_beyond_max_running() -> None:
    e = ScriptedEngine(ScriptedSettings(tokens_per_second=100, max_running=1))
    await e.start()
    first = asyncio.create_task(collect(e, request("a", max_tokens=5)))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(collect(e, request("b", max_tokens=5)))
    await asyncio.sleep(0.01)
    assert (e.load().running, e.load().waiting) == (1, 1)
    await asyncio.gather(first, second)
    assert (e.load().running, e.load().waiting) == (0, 0)
    assert e.completed == ["a", "b"]


async def test_fault_injection() -> None:
    e = ScriptedEngine(ScriptedSettings(fail_after=2))
    await e.start()
    with pytest.raises(DependencyDown):
        await collect(e, request(max_tokens=5))
    assert e.load().running == 0


async def test_validation(engine: ScriptedEngine) -> None:
    with pytest.raises(NotFound, match="served models: scripted"):
        await collect(engine, GenerationRequest("x", "nope", GenerationInput.text("hi")))
    with pytest.raises(InvalidRequest, match="lower max_tokens to at most 2046"):
        await collect(engine, request(max_tokens=5000))
    with pytest.raises(DependencyDown, match="not started"):
        await collect(ScriptedEngine(), request())


def test_value_objects_validate() -> None:
    with pytest.raises(InvalidRequest, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(InvalidRequest, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(InvalidRequest, match="min_tokens"):
        Sampling(max_tokens=2, min_tokens=3)
    with pytest.raises(InvalidRequest, match="top_logprobs needs logprobs"):
        Sampling(top_logprobs=2)
    with pytest.raises(InvalidRequest, match="exactly one"):
        GenerationInput(prompt="a", prompt_token_ids=(1,))
    with pytest.raises(InvalidRequest, match="no messages"):
        GenerationInput.messages([])
    with pytest.raises(InvalidRequest, match="kind"):
        StructuredSpec("yaml", "x")
    with pytest.raises(InvalidRequest, match="choice"):
        StructuredSpec("choice")
    assert GenerationInput.messages([ChatMessage("user", "hi")]).add_generation_prompt


async def test_tokenize_roundtrip(engine: ScriptedEngine) -> None:
    ids = await engine.tokenize("scripted", GenerationInput.tokens([3, 4]))
    assert ids == [3, 4]
    assert await engine.detokenize("scripted", ids) == "tok3 tok4"
    assert len(await engine.tokenize("scripted", GenerationInput.text("a b c"))) == 3
