"""Embeddings throughput through the public API: inputs embedded per second at given batch sizes.

Run against a running stack (`make run` serves all-minilm-l6-v2), with the official OpenAI SDK, one
request at a time per batch size, for a fixed time:

    .venv/bin/python -m llmesh.bench.embeddings --base-url http://127.0.0.1:8080/v1 \
        --api-key "$LLMESH_API_KEY" --batches 1,64 --seconds 20

Inputs are distinct sentences of about 12 tokens, so no cache can help.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Iterator

import openai

WORDS = (
    "the worker keeps one engine busy and streams every token back as soon as it is ready while "
    "the scheduler picks a worker for each request from its queue of waiting prompts"
).split()


def sentences() -> Iterator[str]:
    """An endless supply of distinct sentences (a counter keeps them apart)."""
    for i in itertools.count():
        yield f"{i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(10))


async def measure(
    client: openai.AsyncOpenAI, model: str, batch: int, seconds: float, source: Iterator[str]
) -> dict[str, float]:
    """Requests of `batch` inputs back to back for `seconds` (after one warm-up request)."""
    await client.embeddings.create(model=model, input=[next(source) for _ in range(batch)])
    began, inputs, requests = time.perf_counter(), 0, 0
    latencies: list[float] = []
    while time.perf_counter() - began < seconds:
        start = time.perf_counter()
        reply = await client.embeddings.create(model=model, input=[next(source) for _ in range(batch)])
        latencies.append(time.perf_counter() - start)
        inputs += len(reply.data)
        requests += 1
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "batch": batch,
        "requests": requests,
        "embeddings_per_s": inputs / elapsed,
        "median_latency_ms": 1000 * latencies[len(latencies) // 2],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per batch size")
    args = parser.parse_args()
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    source = sentences()
    for batch in (int(b) for b in args.batches.split(",")):
        print(json.dumps(await measure(client, args.model, batch, args.seconds, source)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
