"""The latency the Envoy edge adds per request, measured against a running stack.

One small unary request (ListModels: gateway → registry) is sent sequentially, N times each way:
native gRPC straight to the gateway, native gRPC through Envoy, and REST `GET /v1/models` through
Envoy. The differences of the percentiles are what the edge adds.

    .venv/bin/python -m llmesh.bench.edge_latency --gateway 127.0.0.1:50051 --edge 127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import grpc

from llmesh.bench.stats import percentile
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc


async def _timed(call: Callable[[], Awaitable[object]], count: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - began) * 1000)
    return samples


async def measure(gateway: str, edge: str, count: int, warmup: int = 50) -> dict[str, dict[str, float]]:
    """p50/p99 in ms for each path, and what the edge adds."""
    results: dict[str, list[float]] = {}
    for name, target in (("grpc direct", gateway), ("grpc via envoy", edge)):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.ModelServiceStub(channel)

            async def unary(stub: pb_grpc.ModelServiceStub = stub) -> None:
                await stub.ListModels(pb.ListModelsRequest())

            results[name] = await _timed(unary, count, warmup)
    async with aiohttp.ClientSession(f"http://{edge}") as http:

        async def rest() -> None:
            async with http.get("/v1/models") as response:
                response.raise_for_status()
                await response.read()

        results["rest via envoy"] = await _timed(rest, count, warmup)
    summary = {
        name: {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99)}
        for name, samples in results.items()
    }
    base = summary["grpc direct"]
    for name in ("grpc via envoy", "rest via envoy"):
        summary[name]["added_p50_ms"] = summary[name]["p50_ms"] - base["p50_ms"]
        summary[name]["added_p99_ms"] = summary[name]["p99_ms"] - base["p99_ms"]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway", default="127.0.0.1:50051")
    parser.add_argument("--edge", default="127.0.0.1:8080")
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    summary = asyncio.run(measure(args.gateway, args.edge, args.count))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
