"""Drive VllmEngine on the tiny model and print what happened as JSON lines (prefix "PROBE ").

Run as a script (vLLM spawns its engine process, which re-imports __main__, hence the guard):
    PYTHONPATH=services:gen python tests/worker/vllm_engine_probe.py MODEL_DIR
test_vllm_engine.py runs it in a subprocess and asserts on the lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmesh.common.errors import LlmeshError
from llmesh.worker.engine import (
    ChatMessage,
    GenerationInput,
    GenerationRequest,
    Sampling,
    StructuredSpec,
)
from llmesh.worker.tiny_model import build_tiny_model
from llmesh.worker.vllm_engine import VllmEngine, VllmSettings

MODEL = "tiny"


T0 = time.perf_counter()


def emit(event: str, **fields: Any) -> None:
    fields["t"] = round(time.perf_counter() - T0, 3)
    print("PROBE " + json.dumps({"event": event, **fields}), flush=True)


async def error_of(engine: VllmEngine, req: GenerationRequest) -> dict[str, str]:
    try:
        async for _ in engine.generate(req):
            pass
    except LlmeshError as e:
        return {"type": type(e).__name__, "message": e.message}
    return {"type": "none", "message": ""}


async def main(model_dir: Path, multiproc_method: str) -> None:
    build_tiny_model(model_dir, show_progress=False)
    engine = VllmEngine(
        VllmSettings(
            model=str(model_dir),
            served_name=MODEL,
            max_model_len=512,
            max_num_seqs=8,
            kv_cache_space_gb=1,
            enforce_eager=True,
            multiproc_method=multiproc_method,
        )
    )
    await engine.start()
    from vllm import envs
    from vllm.platforms import current_platform

    emit(
        "started",
        seconds=engine.start_seconds,
        models=[asdict(m) for m in engine.models()],
        platform=current_platform.device_type,
        envs_cached=envs._is_envs_cache_enabled(),
    )

    chat = GenerationInput.messages([ChatMessage("system", "Be brief."), ChatMessage("user", "Hello!")])
    req = GenerationRequest("chat-1", MODEL, chat, Sampling(max_tokens=16, ignore_eos=True, seed=1))
    began = time.perf_counter()
    first = None
    text, n_chunks = "", 0
    async for chunk in engine.generate(req):
        first = first or time.perf_counter() - began
        n_chunks += 1
        text += "".join(c.text for c in chunk.choices)
        emit("chunk", **asdict(chunk))
    total = time.perf_counter() - began
    emit(
        "usage",
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        chunks=n_chunks,
        text=text,
        ttft_s=first,
        total_s=total,
        tokens_per_s=chunk.completion_tokens / total,
    )
    emit("load_after_stream", **asdict(engine.load()))

    # Same seed, same prompt: same tokens.
    again = [c async for c in engine.generate(GenerationRequest("chat-2", MODEL, chat, req.sampling))]
    emit("seeded_repeat", text="".join(x.text for c in again for x in c.choices))

    # n=2 with logprobs.
    multi = GenerationRequest(
        "multi",
        MODEL,
        GenerationInput.text("The market"),
        Sampling(max_tokens=4, n=2, logprobs=True, top_logprobs=2),
    )
    chunks = [c async for c in engine.generate(multi)]
    last = chunks[-1]
    emit(
        "multi",
        finished=last.finished,
        completion_tokens=last.completion_tokens,
        final_indexes=sorted(c.index for c in last.choices),
        final_reasons=[c.finish_reason for c in last.choices],
        logprobs_per_token=[len(lp.top) for c in chunks for ch in c.choices for lp in ch.logprobs],
    )

    # Structured output: the answer must be one of the choices, whatever the random weights say.
    structured = GenerationRequest(
        "choice",
        MODEL,
        GenerationInput.text("Pick one:"),
        Sampling(max_tokens=8, structured=StructuredSpec("choice", choices=("yes", "no"))),
    )
    try:
        out = [c async for c in engine.generate(structured)]
        emit("structured", text="".join(x.text for c in out for x in c.choices), error=None)
    except Exception as e:  # reported, asserted by the test
        emit("structured", text="", error=f"{type(e).__name__}: {e}")

    # Cancel: leave the stream after 2 chunks; the engine must abort the request.
    cancel = GenerationRequest("cancel-1", MODEL, chat, Sampling(max_tokens=400, ignore_eos=True))
    seen = 0
    async with contextlib.aclosing(engine.generate(cancel)) as stream:
        async for _ in stream:
            seen += 1
            if seen == 2:
                emit("load_mid_stream", **asdict(engine.load()))
                break
    left_at = time.perf_counter()
    for _ in range(500):  # the abort is immediate; allow 5 s before reporting what is left
        if not engine.load().running:
            break
        await asyncio.sleep(0.01)
    emit(
        "cancel",
        chunks_seen=seen,
        unfinished=engine._llm.get_num_unfinished_requests(),
        in_flight=engine.in_flight(),
        settle_s=time.perf_counter() - left_at,
        **asdict(engine.load()),
    )

    # Cancel by task cancellation (what a gRPC handler sees when its client goes away).
    async def consume() -> None:
        async for _ in engine.generate(GenerationRequest("cancel-2", MODEL, chat, cancel.sampling)):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    emit("cancel_task", unfinished=engine._llm.get_num_unfinished_requests(), in_flight=engine.in_flight())

    # The same long prompt twice: the second one should hit the prefix cache.
    long_text = GenerationInput.text(" ".join(f"word{i}" for i in range(50)))
    for i in range(2):
        async for _ in engine.generate(
            GenerationRequest(f"prefix-{i}", MODEL, long_text, Sampling(max_tokens=2))
        ):
            pass
    emit("prefix_cache", **asdict(engine.load()))

    # Validation errors say what to fix.
    long_prompt = GenerationInput.tokens([5] * 500)
    emit(
        "error_too_long",
        **await error_of(engine, GenerationRequest("e1", MODEL, long_prompt, Sampling(max_tokens=64))),
    )
    emit("error_unknown_model", **await error_of(engine, GenerationRequest("e2", "nope", chat)))
    emit(
        "error_bad_token",
        **await error_of(engine, GenerationRequest("e3", MODEL, GenerationInput.tokens([99999]))),
    )

    ids = await engine.tokenize(MODEL, GenerationInput.text("Hello world"), add_special_tokens=False)
    emit("tokenize", ids=ids, text=await engine.detokenize(MODEL, ids))

    began = time.perf_counter()
    await engine.shutdown()
    emit("shutdown", seconds=time.perf_counter() - began)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "spawn"))
