"""Time to first token and tokens per second of one engine adapter, on this machine.

It drives the adapter directly (no gRPC, no Envoy), built by the worker's own `build_engine`, so
the numbers are the engine's plus the adapter's. Examples:

    python -m llmesh.bench.engines llamacpp                       # the Gemma 3 270M GGUF
    python -m llmesh.bench.engines vllm --path ~/.cache/llmesh-tests/tiny-llama
    python -m llmesh.bench.engines openai --base-url http://127.0.0.1:8000/v1 --model tiny-llama
    python -m llmesh.bench.engines anthropic --base-url http://127.0.0.1:9000 --model claude-x

Each round sends `--concurrency` requests at once; TTFT is measured to the first chunk with text,
per-stream tokens/s over the decode phase (first token to last), aggregate tokens/s over the round.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import AsyncGenerator
from typing import Any

from llmesh.common.config import ModelConfig
from llmesh.worker.engine import (
    ChatMessage,
    Engine,
    GenerationChunk,
    GenerationInput,
    GenerationRequest,
    Sampling,
)
from llmesh.worker.engine_factory import build_engine

PROMPT = "Write a short story about a market by a river on a cold morning."


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.engine == "llamacpp" and not args.path:
        from llmesh.worker.gemma_default import gemma_model_config

        base = gemma_model_config()
        return ModelConfig(**{**base.__dict__, "n_threads": args.threads, "n_parallel": args.concurrency})
    return ModelConfig(
        name=args.model,
        engine=args.engine,
        path=args.path,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        upstream_model=args.upstream_model,
        max_model_len=args.max_model_len,
        max_num_seqs=max(4, args.concurrency),
        n_threads=args.threads,
        n_parallel=args.concurrency,
    )


async def one_request(engine: Engine, model: str, i: int, args: argparse.Namespace) -> dict[str, float]:
    sampling = Sampling(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=args.engine != "anthropic")
    if args.engine == "anthropic":
        sampling = Sampling(max_tokens=args.max_tokens)
    inp = (
        GenerationInput.messages([ChatMessage("user", PROMPT)]) if args.chat else GenerationInput.text(PROMPT)
    )
    req = GenerationRequest(f"bench-{i}", model, inp, sampling)
    began = time.perf_counter()
    first = last = 0.0
    final: GenerationChunk | None = None
    stream = engine.generate(req)
    assert isinstance(stream, AsyncGenerator)
    async with contextlib.aclosing(stream):
        async for chunk in stream:
            now = time.perf_counter()
            if not first and any(c.text for c in chunk.choices):
                first = now
            last, final = now, chunk
    assert final is not None and final.finished
    decode_s = max(last - first, 1e-9)
    return {
        "ttft_s": first - began,
        "completion_tokens": final.completion_tokens,
        "prompt_tokens": final.prompt_tokens,
        "stream_tokens_per_s": (final.completion_tokens - 1) / decode_s,
        "seconds": last - began,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = model_config(args)
    engine = build_engine(cfg)
    began = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - began
    try:
        await one_request(engine, cfg.name, -1, args)  # warm-up: first-call costs stay out of the numbers
        samples: list[dict[str, float]] = []
        round_rates = []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            batch = await asyncio.gather(
                *(
                    one_request(engine, cfg.name, r * args.concurrency + k, args)
                    for k in range(args.concurrency)
                )
            )
            round_rates.append(sum(s["completion_tokens"] for s in batch) / (time.perf_counter() - t0))
            samples += batch
    finally:
        await engine.shutdown()
    return {
        "engine": args.engine,
        "model": cfg.name,
        "concurrency": args.concurrency,
        "requests": len(samples),
        "max_tokens": args.max_tokens,
        "start_s": round(start_s, 2),
        "ttft_ms_median": round(1000 * statistics.median(s["ttft_s"] for s in samples), 1),
        "ttft_ms_max": round(1000 * max(s["ttft_s"] for s in samples), 1),
        "stream_tokens_per_s_median": round(statistics.median(s["stream_tokens_per_s"] for s in samples), 1),
        "aggregate_tokens_per_s": round(statistics.median(round_rates), 1),
        "prompt_tokens": samples[0]["prompt_tokens"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("engine", choices=["vllm", "llamacpp", "openai", "anthropic"])
    parser.add_argument(
        "--model", default="bench-model", help="served name (openai/anthropic: sent upstream)"
    )
    parser.add_argument("--path", default="", help="vllm: weights dir; llamacpp: .gguf (default: Gemma 270M)")
    parser.add_argument("--base-url", default="")
    parser.add_argument("--api-key-env", default="")
    parser.add_argument("--upstream-model", default="")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="llamacpp: n_threads (0: default)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--chat", action="store_true", help="send a chat instead of a text prompt")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
