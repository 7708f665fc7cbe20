"""The endpoint picker's added time to first token, with the engine taken out.

Registry, scheduler (Envoy's endpoint picker and EDS) and auth run as `llmesh serve` processes, Envoy
as `llmesh up` starts it, and one worker whose engine is the ScriptedEngine **test double**
(`llmesh.bench.scripted_worker`, benchmarks and tests only, never a serving engine): it emits tokens
at a fixed rate per stream, so what differs between the paths is the platform alone.

The same native gRPC client (`ModelService.StreamChatCompletion`, one stream) calls the worker
three ways: directly; through a second Envoy with the same bootstrap but the picker taken out of
the inference routes (`llmesh.bench.picker_free_edge`, bench only); and through the real edge (the
picker's ext_proc exchange and lease, then the route to the picked worker; auth is off, its check
has its own target). The paths alternate in blocks, so drift on a shared machine hits all alike.
With picker minus without is what the picker adds to TTFT; with picker minus directly is what the
whole edge adds. Envoy's access log gives a third view: how long each measured request waited for
the picker's answer (`picker_us`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from llmesh.bench.grpc_client import ModelStreamClient, run_level, wait_until_serving
from llmesh.bench.picker_free_edge import PickerFreeEnvoy
from llmesh.bench.procs import ChildProcess, ProcessMeter
from llmesh.bench.run import say
from llmesh.bench.settings import BenchSettings
from llmesh.bench.stats import PERCENTILES, RequestSample, percentile, summarize
from llmesh.bench.targets import write_llmesh_config

MODEL = "scripted-fixed"
PROMPT = "measure the platform overhead with the engine taken out of the picture"
MAX_MODEL_LEN = 4096
MAX_NUM_SEQS = 256


def _model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "engine": "scripted",
        "max_model_len": MAX_MODEL_LEN,
        "max_output_tokens": MAX_MODEL_LEN,
        "max_num_seqs": MAX_NUM_SEQS,
        "description": "benchmark-only test double (llmesh.bench.scripted_worker)",
    }


async def _start_scripted_worker(
    run_dir: Path, registry: str, model: str, tokens_per_second: float
) -> tuple[ChildProcess, str]:
    ready = run_dir / "run" / f"{model}.ready.json"
    ready.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "llmesh.bench.scripted_worker",
        "--registry",
        registry,
        "--model",
        model,
        "--worker-id",
        model,
        "--tokens-per-second",
        str(tokens_per_second),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--ready-file",
        str(ready),
    ]
    child = ChildProcess(model, argv, run_dir / "logs" / f"{model}.log")
    child.start()

    async def is_ready() -> bool:
        return ready.exists()

    await child.wait_ready(is_ready, 60.0)
    return child, f"127.0.0.1:{json.loads(ready.read_text())['port']}"


def _start_control_plane(run_dir: Path, config: Path) -> tuple[Any, dict[str, str]]:
    from llmesh.cli.stack import Stack

    stack = Stack(run_dir, config)
    addresses = {}
    for kind in ("registry", "scheduler", "auth"):
        child = stack.start(kind, listen="127.0.0.1:0")
        addresses[kind] = f"127.0.0.1:{child.port}"
        stack.set_endpoint(kind, addresses[kind])
    return stack, addresses


def _start_envoy(stack: Any, config: Path) -> tuple[str, Any]:
    """The edge as `llmesh up` starts it, and its settings (the picker-free Envoy reuses them)."""
    from llmesh.common.config import load_config
    from llmesh.edge.supervise import stack_settings, start_envoy_child

    cfg = load_config(config)
    return start_envoy_child(stack, cfg), stack_settings(stack, cfg)


async def _picker_waits_ms(envoy_log: Path, count: int) -> dict[str, float]:
    """p50/p90/p99 of the last `count` picker waits in Envoy's access log (the measured requests:
    they come after the warm-up in the log). Envoy flushes its access log every second."""
    await asyncio.sleep(2.0)
    waits = []
    text = await asyncio.to_thread(envoy_log.read_text, errors="replace")
    for line in text.splitlines():
        if line.startswith("{") and '"picker_us"' in line:
            picker_us = json.loads(line).get("picker_us")  # Envoy writes the number as a string
            if picker_us is not None and str(picker_us).isdigit():
                waits.append(int(picker_us) / 1000)
    waits = waits[-count:]
    if len(waits) < count:
        raise RuntimeError(f"Envoy's access log has {len(waits)} picker timings, expected {count}")
    return {**{f"p{q}": percentile(waits, q) for q in PERCENTILES}, "count": float(len(waits))}


def _quantile_gaps(slow: dict[str, Any], fast: dict[str, Any]) -> dict[str, float]:
    return {q: slow["ttft_ms"][q] - fast["ttft_ms"][q] for q in ("p50", "p90", "p99")}


async def run_overhead(settings: BenchSettings, run_dir: Path) -> dict[str, Any]:
    ov = settings.overhead
    config = write_llmesh_config(
        run_dir / "llmesh.yaml", [_model_entry(MODEL)], [{"worker_id": MODEL, "models": [MODEL]}]
    )
    stack: Any = None
    worker: ChildProcess | None = None
    picker_free: PickerFreeEnvoy | None = None
    clients: list[ModelStreamClient] = []
    try:
        say(
            "overhead: starting registry, scheduler, auth, a scripted-double worker, Envoy, Envoy without the picker"
        )
        stack, addresses = await asyncio.to_thread(_start_control_plane, run_dir, config)
        worker, worker_address = await _start_scripted_worker(
            run_dir, addresses["registry"], MODEL, ov.tokens_per_second
        )
        envoy, edge_settings = await asyncio.to_thread(_start_envoy, stack, config)
        picker_free = PickerFreeEnvoy(edge_settings, run_dir / "run" / "envoy-without-picker", worker_address)
        await picker_free.start()
        # The three paths, cheapest first: the worker, Envoy without the picker, the real edge.
        paths = {
            "direct": ModelStreamClient(worker_address, MODEL, ov.output_tokens, streams=1, timeout_s=60),
            "envoy": ModelStreamClient(
                picker_free.grpc_target, MODEL, ov.output_tokens, streams=1, timeout_s=60
            ),
            "via": ModelStreamClient(envoy, MODEL, ov.output_tokens, streams=1, timeout_s=60),
        }
        clients += paths.values()
        for client in paths.values():
            failure = await wait_until_serving(client, PROMPT, timeout_s=60.0)
            if failure is not None:
                raise RuntimeError(f"{client.address} never served a request: {failure}")
            await run_level(client, [PROMPT] * ov.warmup, 1)
        pids = {"worker": worker.pid, "client": os.getpid()}
        pids |= {c.name: c.process.pid for c in stack.children}
        meter = ProcessMeter(pids)
        samples: dict[str, list[RequestSample]] = {name: [] for name in paths}
        durations = dict.fromkeys(paths, 0.0)
        cpu: dict[str, float] = {}
        done = 0
        while done < ov.requests:
            block = min(ov.block, ov.requests - done)
            for name, client in paths.items():
                before = meter.snapshot()
                run = await run_level(client, [PROMPT] * block, 1)
                after = meter.snapshot()
                samples[name] += run.samples
                durations[name] += run.duration_s
                for proc, entry in ProcessMeter.delta(before, after).items():
                    cpu[f"{name}:{proc}"] = cpu.get(f"{name}:{proc}", 0.0) + entry["cpu_s"]
            done += block
        levels = {name: summarize(samples[name], durations[name]) for name in paths}
        added = _quantile_gaps(levels["via"], levels["direct"])
        picker_added = _quantile_gaps(levels["via"], levels["envoy"])
        picker = await _picker_waits_ms(run_dir / "logs" / "envoy.log", levels["via"]["completed"])
        per_request_us = {
            proc: cpu.get(f"via:{proc}", 0.0) / max(1, levels["via"]["completed"]) * 1e6
            for proc in ("envoy", "scheduler", "auth")
        }
        say(
            f"overhead: TTFT p50 / p99 directly {levels['direct']['ttft_ms']['p50']:.2f} / "
            f"{levels['direct']['ttft_ms']['p99']:.2f} ms, Envoy without the picker "
            f"{levels['envoy']['ttft_ms']['p50']:.2f} / {levels['envoy']['ttft_ms']['p99']:.2f} ms, Envoy + "
            f"picker {levels['via']['ttft_ms']['p50']:.2f} / {levels['via']['ttft_ms']['p99']:.2f} ms; the "
            f"picker adds {picker_added['p50']:+.2f} / {picker_added['p99']:+.2f} ms (Envoy's access log: "
            f"waits {picker['p50']:.2f} / {picker['p99']:.2f} ms)"
        )
        return {
            "status": "ok",
            "tokens_per_second_per_stream": ov.tokens_per_second,
            "output_tokens": ov.output_tokens,
            "requests": ov.requests,
            "block": ov.block,
            "direct": levels["direct"],
            "envoy_without_picker": levels["envoy"],
            "via": levels["via"],
            "added_ttft_ms": added,
            "picker_added_ttft_ms": picker_added,
            "picker_wait_ms": picker,
            "cpu_us_per_request_via": per_request_us,
        }
    except Exception as error:
        say(f"overhead failed: {type(error).__name__}: {error}")
        return {"status": f"failed: {type(error).__name__}: {str(error)[:1500]}"}
    finally:
        for opened in clients:
            await opened.aclose()
        say("overhead: stopping")
        if picker_free is not None:
            await picker_free.stop()
        if worker is not None:
            await asyncio.to_thread(worker.stop, 10.0)
        if stack is not None:
            await asyncio.to_thread(stack.stop_all)
