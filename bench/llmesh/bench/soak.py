"""Soak: rounds of requests at a fixed concurrency through Envoy on a whole llmesh stack (one vLLM
worker), with every response status and the memory (RSS) of every process after each round.

Each round sends `requests` requests at `concurrency` streams: REST with vLLM's own client (its
failures are counted from its per-request errors), or native gRPC with ours. Envoy's own counters
(`http.llmesh_edge.downstream_rq_<class>`, and the 503s it answered itself or passed on from a
worker, `cluster.llmesh_workers.upstream_rq_503`) are read before and after each round. Memory is
flat when every process's RSS after the last round is within max(8 MiB, 5 %) of its RSS after the
first (the first round warms every cache and pool up).

vLLM's engine processes grow under load whoever serves them, so a REST soak then runs the same rounds
against `vllm serve` (same engine settings, same client): the report sets the growth of llmesh's
engine beside that of vLLM's own server's engine, measured in the same run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

from llmesh.bench.grpc_client import ModelStreamClient, run_level, wait_until_serving
from llmesh.bench.procs import FLAT_TOLERANCE_FRACTION, FLAT_TOLERANCE_MIB, MiB, ProcessMeter
from llmesh.bench.run import say, vllm_load
from llmesh.bench.settings import BenchSettings
from llmesh.bench.stats import summarize, summarize_vllm
from llmesh.bench.targets import (
    BaselineServer,
    LlmeshStack,
    envoy_stats,
    vllm_model_entry,
    write_llmesh_config,
)
from llmesh.bench.vllm_client import run_vllm_bench, sample_prompts

log = logging.getLogger(__name__)

ENVOY_COUNTERS = ("http.llmesh_edge.downstream_rq_", "cluster.llmesh_workers.upstream_rq_")


def _rss_mib(meter: ProcessMeter) -> dict[str, dict[str, float]]:
    return {
        name: {"rss_mib": snap.rss_bytes / MiB, "tree_rss_mib": snap.tree_rss_bytes / MiB}
        for name, snap in meter.snapshot().items()
    }


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def _series_flatness(series: list[float]) -> dict[str, Any]:
    growth = series[-1] - series[0]
    tolerance = max(FLAT_TOLERANCE_MIB, FLAT_TOLERANCE_FRACTION * series[0])
    return {"rss_mib": series, "growth_mib": growth, "tolerance_mib": tolerance, "flat": growth <= tolerance}


def flatness(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per process: RSS after each round, growth first → last. A worker's engine processes (its
    descendants: vLLM's engine core) are a series of their own, `<worker> engine`, so that growth
    in the worker's own process and growth in the engine are told apart."""
    out: dict[str, dict[str, Any]] = {}
    if not rounds:
        return out
    for name in rounds[0]["rss"]:
        present = [r["rss"][name] for r in rounds if name in r["rss"]]
        out[name] = _series_flatness([p["rss_mib"] for p in present])
        engine = [p["tree_rss_mib"] - p["rss_mib"] for p in present]
        if any(engine):
            out[f"{name} engine"] = _series_flatness(engine)
    return out


def _done(result: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    result["memory"] = flatness(rounds)
    result["status"] = "ok"


def _failed(error: Exception) -> str:
    return f"failed: {type(error).__name__}: {str(error)[:1500]}"


async def run_soak(settings: BenchSettings, run_dir: Path) -> dict[str, Any]:
    soak = settings.soak
    assert soak is not None
    config = write_llmesh_config(
        run_dir / "llmesh.yaml", [vllm_model_entry(settings.engine)], [{"worker_id": "worker-0"}]
    )
    stack = LlmeshStack(run_dir, config)
    rounds: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "path": soak.path,
        "concurrency": soak.concurrency,
        "requests_per_round": soak.requests,
        "rounds": rounds,
    }
    client: ModelStreamClient | None = None
    try:
        say(
            f"soak: starting the llmesh stack; {soak.rounds} rounds of {soak.requests} {soak.path} requests "
            f"at {soak.concurrency} streams through Envoy"
        )
        await asyncio.to_thread(stack.start)
        pids = stack.pids()
        meter = ProcessMeter(pids)
        result["rss_before"] = _rss_mib(meter)
        load = dataclasses.replace(
            vllm_load(settings, f"http://{stack.envoy}", soak.concurrency), num_prompts=soak.requests
        )
        prompts: list[str] = []
        if soak.path == "grpc":
            client = ModelStreamClient(
                stack.envoy, settings.engine.served_name, load.output_len, streams=soak.concurrency
            )
            failure = await wait_until_serving(client, "hello")
            if failure is not None:
                raise RuntimeError(f"never served a request: {failure}")
            prompts = await asyncio.to_thread(sample_prompts, load)
        for index in range(soak.rounds):
            before = await envoy_stats(stack.envoy_admin, ENVOY_COUNTERS)
            if client is not None:
                run = await run_level(client, prompts, soak.concurrency)
                level = summarize(run.samples, run.duration_s)
            else:
                level = summarize_vllm(
                    await run_vllm_bench(load, run_dir / "vllm-client", f"soak-round{index + 1}")
                )
            await asyncio.sleep(2.0)  # let stream teardown and lease releases finish
            after = await envoy_stats(stack.envoy_admin, ENVOY_COUNTERS)
            envoy = _delta(before, after)
            entry = {
                "round": index + 1,
                "completed": level["completed"],
                "failed": level["failed"],
                "error_examples": level["error_examples"],
                "output_tokens_per_s": level["output_tokens_per_s"],
                "ttft_ms": level["ttft_ms"],
                "envoy": envoy,
                "envoy_503": envoy.get("cluster.llmesh_workers.upstream_rq_503", 0),
                "envoy_5xx": envoy.get("http.llmesh_edge.downstream_rq_5xx", 0),
                "rss": _rss_mib(meter),
            }
            rounds.append(entry)
            rss = ", ".join(f"{n} {v['tree_rss_mib']:.0f}" for n, v in entry["rss"].items())
            say(
                f"soak round {index + 1}/{soak.rounds}: {entry['completed']} ok, {entry['failed']} failed, "
                f"Envoy 5xx {entry['envoy_5xx']}, upstream 503 {entry['envoy_503']}; "
                f"{entry['output_tokens_per_s']:.0f} tok/s; RSS MiB: {rss}"
            )
        _done(result, rounds)
    except Exception as error:
        log.exception("soak failed")
        result["status"] = _failed(error)
    finally:
        if client is not None:
            await client.aclose()
        say("soak: stopping the stack")
        await asyncio.to_thread(stack.stop)

    return result


async def run_baseline_soak(settings: BenchSettings, run_dir: Path) -> dict[str, Any]:
    """The soak's rounds against `vllm serve` with vLLM's client: RSS of its API server and of its
    engine processes after each round (the reference for the engine's own growth)."""
    soak = settings.soak
    assert soak is not None
    server = BaselineServer(settings.engine, run_dir)
    rounds: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "concurrency": soak.concurrency,
        "requests_per_round": soak.requests,
        "rounds": rounds,
    }
    try:
        say(f"soak: starting vllm serve; the same {soak.rounds} rounds against it")
        await server.start()
        meter = ProcessMeter({"vllm_api_server": server.pid})
        load = dataclasses.replace(
            vllm_load(settings, server.url, soak.concurrency), num_prompts=soak.requests
        )
        for index in range(soak.rounds):
            level = summarize_vllm(
                await run_vllm_bench(load, run_dir / "vllm-client", f"soak-round{index + 1}")
            )
            await asyncio.sleep(2.0)  # as for llmesh: the same settling time before measuring
            entry = {
                "round": index + 1,
                "completed": level["completed"],
                "failed": level["failed"],
                "output_tokens_per_s": level["output_tokens_per_s"],
                "rss": _rss_mib(meter),
            }
            rounds.append(entry)
            rss = entry["rss"]["vllm_api_server"]
            say(
                f"soak vllm serve round {index + 1}/{soak.rounds}: {entry['completed']} ok, "
                f"{entry['failed']} failed; {entry['output_tokens_per_s']:.0f} tok/s; RSS MiB: API server "
                f"{rss['rss_mib']:.0f}, engine {rss['tree_rss_mib'] - rss['rss_mib']:.0f}"
            )
        _done(result, rounds)
    except Exception as error:
        log.exception("vllm serve soak failed")
        result["status"] = _failed(error)
    finally:
        say("soak: stopping vllm serve")
        await server.stop()
    return result
