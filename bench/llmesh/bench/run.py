"""The engine targets, side by side, one engine at a time, on the same model and engine settings:

- `baseline`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`, what
  `vllm serve` runs), load from vLLM's own serving benchmark client;
- `rest`: a whole llmesh stack (`llmesh up`'s start_stack: registry, scheduler = endpoint picker,
  auth, one vLLM worker, Envoy), OpenAI REST through Envoy, load from vLLM's client;
- `grpc`: the same stack, native gRPC `ModelService.StreamChatCompletion` through Envoy, load from
  llmesh's gRPC client with vLLM's prompts and vLLM's metric definitions.

Per level, the CPU (user + system) and RSS of every process of the target are read at the start and
the end of the measured run: cores = CPU seconds / wall seconds, µs per token = CPU seconds / output
tokens.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from llmesh.bench.grpc_client import ModelStreamClient, run_level, wait_until_serving
from llmesh.bench.procs import CpuSnapshot, ProcessMeter
from llmesh.bench.settings import BenchSettings
from llmesh.bench.stats import summarize, summarize_vllm
from llmesh.bench.targets import BaselineServer, LlmeshStack, vllm_model_entry, write_llmesh_config
from llmesh.bench.vllm_client import VllmLoad, run_vllm_bench, sample_prompts

log = logging.getLogger(__name__)

VLLM_SUMMARY_KEYS = (
    "duration",
    "completed",
    "failed",
    "total_output_tokens",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
)


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def _processes(before: dict[str, CpuSnapshot], after: dict[str, CpuSnapshot], tokens: int) -> dict[str, Any]:
    out = ProcessMeter.delta(before, after)
    for entry in out.values():
        entry["cpu_us_per_token"] = entry["cpu_s"] / tokens * 1e6 if tokens else float("nan")
        entry["tree_cpu_us_per_token"] = entry["tree_cpu_s"] / tokens * 1e6 if tokens else float("nan")
    return out


def print_level(target: str, level: dict[str, Any], frontend: list[str]) -> None:
    cpu = sum(level["processes"].get(n, {}).get("cpu_cores", 0.0) for n in frontend)
    say(
        f"{target:>8} c={level['concurrency']:<3} {level['output_tokens_per_s']:8.0f} tok/s  "
        f"TTFT p50 {level['ttft_ms']['p50']:7.1f} p99 {level['ttft_ms']['p99']:7.1f} ms  "
        f"ITL p50 {level['itl_ms']['p50']:6.1f} p99 {level['itl_ms']['p99']:6.1f} ms  "
        f"TPOT p50 {level['tpot_ms']['p50']:6.2f} ms  frontend {cpu:4.2f} cores  failed {level['failed']}"
    )


async def vllm_level(name: str, load: VllmLoad, meter: ProcessMeter, result_dir: Path) -> dict[str, Any]:
    """One level through vLLM's client, process meters read around its main run."""
    marks: dict[str, dict[str, CpuSnapshot]] = {}

    def started(pid: int) -> None:
        meter.add("client", pid)
        marks["before"] = meter.snapshot()

    def ended(pid: int) -> None:
        marks["after"] = meter.snapshot()

    result = await run_vllm_bench(load, result_dir, name, on_main_run=started, on_result=ended)
    level = {"concurrency": load.concurrency, "num_prompts": load.num_prompts, **summarize_vllm(result)}
    # vLLM's own summary, kept beside ours (computed from the same per-request lists).
    level["vllm_summary"] = {k: result.get(k) for k in VLLM_SUMMARY_KEYS}
    level["processes"] = (
        _processes(marks["before"], marks["after"], level["output_tokens"])
        if "before" in marks and "after" in marks
        else {}
    )
    return level


async def grpc_level(
    client: ModelStreamClient, load: VllmLoad, meter: ProcessMeter, warmups: int
) -> dict[str, Any]:
    prompts = await asyncio.to_thread(sample_prompts, load)
    if warmups:
        await run_level(client, [prompts[0]] * warmups, load.concurrency)
    before = meter.snapshot()
    run = await run_level(client, prompts, load.concurrency)
    after = meter.snapshot()
    level = {
        "concurrency": load.concurrency,
        "num_prompts": load.num_prompts,
        **summarize(run.samples, run.duration_s),
    }
    level["processes"] = _processes(before, after, level["output_tokens"])
    return level


def vllm_load(settings: BenchSettings, base_url: str, concurrency: int) -> VllmLoad:
    load, engine = settings.load, settings.engine
    return VllmLoad(
        base_url=base_url,
        model=engine.served_name,
        tokenizer=engine.model_dir,
        concurrency=concurrency,
        num_prompts=load.prompts_for(concurrency),
        input_len=load.input_len,
        output_len=load.output_len,
        warmups=load.warmups_for(concurrency),
        seed=load.seed,
    )


BASELINE_FRONTEND = ["vllm_api_server"]
LLMESH_FRONTEND = ["worker", "envoy", "scheduler", "registry", "auth"]


async def run_baseline(
    settings: BenchSettings, run_dir: Path, name: str = "baseline", engine_nice: int = 0
) -> dict[str, Any]:
    """vLLM's OpenAI server under vLLM's client; `engine_nice` > 0 runs its engine processes at that
    nice once it is up (`baseline-nice`)."""
    server = BaselineServer(settings.engine, run_dir, engine_nice=engine_nice)
    say(f"{name}: starting vLLM's OpenAI server on {server.url}")
    levels = []
    try:
        await server.start()
        meter = ProcessMeter({"vllm_api_server": server.pid})
        for concurrency in settings.load.concurrency:
            load = vllm_load(settings, server.url, concurrency)
            level = await vllm_level(f"{name}-c{concurrency}", load, meter, run_dir / "vllm-client")
            levels.append(level)
            print_level(name, level, BASELINE_FRONTEND)
        return {"status": "ok", "frontend": BASELINE_FRONTEND, "levels": levels, "engine_nice": engine_nice}
    except Exception as error:
        log.exception("%s failed", name)
        return {"status": f"failed: {type(error).__name__}: {str(error)[:1500]}", "levels": levels}
    finally:
        say(f"{name}: stopping vLLM's server")
        await server.stop()


async def run_llmesh(settings: BenchSettings, run_dir: Path) -> dict[str, dict[str, Any]]:
    """The `rest` and `grpc` targets (those selected) on one llmesh stack with one vLLM worker."""
    config = write_llmesh_config(
        run_dir / "llmesh.yaml", [vllm_model_entry(settings.engine)], [{"worker_id": "worker-0"}]
    )
    stack = LlmeshStack(run_dir, config)
    wanted = [t for t in ("rest", "grpc") if settings.wants(t)]
    results: dict[str, dict[str, Any]] = {}
    try:
        say("llmesh: starting registry, scheduler (picker), auth, one vLLM worker, Envoy")
        await asyncio.to_thread(stack.start)
        pids = stack.pids()
        pids["worker"] = pids.pop("worker-0")
        meter = ProcessMeter(pids)
        say(f"llmesh: Envoy on {stack.envoy}")
        if "rest" in wanted:
            levels: list[dict[str, Any]] = []
            results["rest"] = {"status": "ok", "frontend": LLMESH_FRONTEND, "levels": levels}
            try:
                for concurrency in settings.load.concurrency:
                    load = vllm_load(settings, f"http://{stack.envoy}", concurrency)
                    level = await vllm_level(f"rest-c{concurrency}", load, meter, run_dir / "vllm-client")
                    levels.append(level)
                    print_level("rest", level, LLMESH_FRONTEND)
            except Exception as error:
                log.exception("rest failed")
                results["rest"]["status"] = f"failed: {type(error).__name__}: {str(error)[:1500]}"
        if "grpc" in wanted:
            levels = []
            results["grpc"] = {"status": "ok", "frontend": LLMESH_FRONTEND, "levels": levels}
            meter.add("client", os.getpid())
            client = ModelStreamClient(
                stack.envoy,
                settings.engine.served_name,
                settings.load.output_len,
                streams=max(settings.load.concurrency),
            )
            try:
                failure = await wait_until_serving(client, "hello")
                if failure is not None:
                    raise RuntimeError(f"never served a request: {failure}")
                for concurrency in settings.load.concurrency:
                    load = vllm_load(settings, "", concurrency)
                    level = await grpc_level(client, load, meter, settings.load.warmups_for(concurrency))
                    levels.append(level)
                    print_level("grpc", level, LLMESH_FRONTEND)
            except Exception as error:
                log.exception("grpc failed")
                results["grpc"]["status"] = f"failed: {type(error).__name__}: {str(error)[:1500]}"
            finally:
                await client.aclose()
    except Exception as error:
        log.exception("llmesh stack failed")
        for name in wanted:
            results.setdefault(name, {"levels": []})["status"] = (
                f"failed: {type(error).__name__}: {str(error)[:1500]}"
            )
    finally:
        say("llmesh: stopping the stack")
        await asyncio.to_thread(stack.stop)
    return results
