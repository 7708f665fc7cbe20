"""The four targets on the real engine: vLLM's server, the worker alone, the gRPC path, the REST path.

Engines run one at a time: vLLM's server is stopped before the llmesh stack starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from llmesh.bench.clients import GatewayStreamClient, OpenAIStreamClient, StreamClient, WorkerStreamClient
from llmesh.bench.loadgen import run_level, wait_until_serving, warm_up
from llmesh.bench.procs import ProcessMeter
from llmesh.bench.settings import BenchSettings, LoadSettings
from llmesh.bench.stats import summarize
from llmesh.bench.targets import (
    BaselineServer,
    ServiceStack,
    start_edge,
    vllm_model_entry,
    write_llmesh_config,
)

log = logging.getLogger(__name__)

# Memory is "flat" when the last round's RSS is within this of the first round's.
FLAT_TOLERANCE_MIB = 4.0
FLAT_TOLERANCE_FRACTION = 0.03


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


async def sweep(
    name: str, client: StreamClient, meter: ProcessMeter, load: LoadSettings, frontend: str
) -> dict[str, Any]:
    """Warm up, then every concurrency level; per level the summary and the processes' CPU/RSS."""
    failure = await wait_until_serving(client)
    if failure is not None:
        return {"status": f"failed: never served a request ({failure})", "frontend": frontend, "levels": []}
    warmup_errors = await warm_up(client, load.warmup_requests, time_limit_s=load.level_timeout_s)
    levels = []
    for concurrency in load.concurrency:
        requests = load.requests_for(concurrency)
        before = meter.snapshot()
        run = await run_level(client, concurrency, requests, time_limit_s=load.level_timeout_s)
        after = meter.snapshot()
        level = {"concurrency": concurrency, "timed_out": run.timed_out, **summarize(run.samples, run.wall_s)}
        level["processes"] = ProcessMeter.delta(before, after)
        levels.append(level)
        cpu = level["processes"].get(frontend, {}).get("cpu_cores", float("nan"))
        say(
            f"{name:>8} c={concurrency:<3} {level['output_tokens_per_s']:8.0f} tok/s  "
            f"TTFT p50 {level['ttft_ms']['p50']:7.1f} ms  p99 {level['ttft_ms']['p99']:7.1f} ms  "
            f"{frontend} CPU {cpu:4.2f}  errors {level['errors']}"
        )
    return {"status": "ok", "frontend": frontend, "warmup_errors": warmup_errors, "levels": levels}


async def memory_rounds(
    client: StreamClient, meter: ProcessMeter, name: str, load: LoadSettings, rounds: int
) -> dict[str, Any]:
    """`rounds` identical rounds at the highest concurrency; the process's RSS after each."""
    concurrency = max(load.concurrency)
    requests = load.requests_for(concurrency)
    before = meter.rss_mib(name)
    rss, errors = [], 0
    for index in range(rounds):
        run = await run_level(client, concurrency, requests, time_limit_s=load.level_timeout_s)
        errors += sum(1 for s in run.samples if not s.ok)
        await asyncio.sleep(1.0)  # let in-flight clean-up (lease releases, stream teardown) finish
        rss.append(meter.rss_mib(name))
        say(f"memory round {index + 1}/{rounds}: {name} RSS {rss[-1]:.1f} MiB")
    growth = rss[-1] - rss[0] if rss else 0.0
    tolerance = max(FLAT_TOLERANCE_MIB, FLAT_TOLERANCE_FRACTION * (rss[0] if rss else 0.0))
    return {
        "process": name,
        "concurrency": concurrency,
        "requests_per_round": requests,
        "rss_before_mib": before,
        "rss_mib": rss,
        "growth_mib": growth,
        "tolerance_mib": tolerance,
        "flat": growth <= tolerance,
        "errors": errors,
    }


async def run_baseline(settings: BenchSettings, prompt: str, run_dir: Path) -> dict[str, Any]:
    load = settings.load
    server = BaselineServer(settings.engine, run_dir)
    say(f"baseline: starting vLLM's OpenAI server on {server.url}")
    try:
        await server.start()
        client = OpenAIStreamClient(
            server.url,
            settings.engine.served_name,
            prompt,
            load.output_tokens,
            connections=max(load.concurrency),
            timeout_s=load.request_timeout_s,
            name="baseline",
            backend=load.http_client,
        )
        try:
            meter = ProcessMeter({"frontend": server.pid, "client": os.getpid()})
            return await sweep("baseline", client, meter, load, "frontend")
        finally:
            await client.aclose()
    except Exception as error:
        log.exception("baseline failed")
        return {"status": f"failed: {type(error).__name__}: {str(error)[:1000]}", "levels": []}
    finally:
        say("baseline: stopping vLLM's server")
        await server.stop()


async def run_llmesh(settings: BenchSettings, prompt: str, run_dir: Path) -> dict[str, Any]:
    """The worker, gRPC and REST targets (those selected) on one llmesh stack, plus the memory check."""
    load, engine = settings.load, settings.engine
    results: dict[str, Any] = {"targets": {}}
    config = write_llmesh_config(
        run_dir / "llmesh.yaml", [vllm_model_entry(engine, load.output_tokens)], [{"worker_id": "worker-0"}]
    )
    stack = ServiceStack(run_dir, config)
    envoy = None
    try:
        say("llmesh: starting registry, scheduler, auth, worker (vLLM), gateway")
        await asyncio.to_thread(stack.start)
        await asyncio.to_thread(stack.start_worker, "worker-0")
        await asyncio.to_thread(stack.start_gateway)
        pids = {
            "gateway": stack.pids["gateway"],
            "worker": stack.pids["worker-0"],
            "scheduler": stack.pids["scheduler"],
            "registry": stack.pids["registry"],
            "client": os.getpid(),  # the load generator (this process)
        }
        meter = ProcessMeter(pids)
        common = (engine.served_name, prompt, load.output_tokens)
        streams = max(load.concurrency)

        if settings.wants("worker"):
            worker = WorkerStreamClient(
                stack.addresses["worker-0"], *common, timeout_s=load.request_timeout_s, streams=streams
            )
            try:
                results["targets"]["worker"] = await sweep("worker", worker, meter, load, "worker")
            finally:
                await worker.aclose()

        if settings.wants("grpc"):
            gateway = GatewayStreamClient(
                stack.addresses["gateway"], *common, timeout_s=load.request_timeout_s, streams=streams
            )
            try:
                results["targets"]["grpc"] = await sweep("grpc", gateway, meter, load, "gateway")
                if settings.rounds > 0:
                    results["memory"] = await memory_rounds(gateway, meter, "gateway", load, settings.rounds)
            finally:
                await gateway.aclose()

        if settings.wants("rest"):
            envoy, reason = await start_edge(stack.addresses, run_dir)
            if envoy is None:
                say(f"rest: {reason}")
                results["targets"]["rest"] = {"status": reason, "levels": []}
            else:
                rest = OpenAIStreamClient(
                    envoy.url,
                    *common,
                    connections=max(load.concurrency),
                    timeout_s=load.request_timeout_s,
                    name="rest",
                    backend=load.http_client,
                )
                rest_meter = ProcessMeter({**pids, "envoy": envoy.pid})
                try:
                    results["targets"]["rest"] = await sweep("rest", rest, rest_meter, load, "gateway")
                finally:
                    await rest.aclose()
    except Exception as error:
        log.exception("llmesh targets failed")
        for name in ("worker", "grpc", "rest"):
            if settings.wants(name) and name not in results["targets"]:
                results["targets"][name] = {
                    "status": f"failed: {type(error).__name__}: {str(error)[:1000]}",
                    "levels": [],
                }
    finally:
        say("llmesh: stopping the stack")
        if envoy is not None:
            await envoy.stop()
        await asyncio.to_thread(stack.stop)
    return results
