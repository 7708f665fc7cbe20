"""Results as JSON (every raw number) and as a Markdown report with ratios against the baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TARGET_LABELS = {
    "baseline": "vllm serve (baseline)",
    "worker": "llmesh worker alone (gRPC)",
    "grpc": "llmesh full path (gRPC)",
    "rest": "llmesh full path (REST via Envoy)",
}
FRONTEND_LABELS = {"frontend": "vLLM API server", "worker": "worker", "gateway": "gateway"}
# Targets of issue 4 (this 2-core machine).
ADDED_TTFT_P50_MS = 1.0
ADDED_TTFT_P99_MS = 3.0
REST_TOLERANCE = 0.10
THROUGHPUT_LEVELS = (16, 64)


def _clean(value: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(_clean(results), indent=1, sort_keys=False) + "\n")
    return path


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _signed(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+,.{digits}f}"


def level_at(target: dict[str, Any] | None, concurrency: int) -> dict[str, Any] | None:
    for level in (target or {}).get("levels", []):
        if level["concurrency"] == concurrency:
            return level
    return None


def _throughput_table(results: dict[str, Any]) -> list[str]:
    targets = results.get("targets", {})
    baseline = targets.get("baseline")
    worker = targets.get("worker")
    rows = [
        "| target | streams | req/s | output tok/s | tok/s vs vllm | TTFT p50 ms | p90 | p99 "
        "| TTFT p50 vs vllm | TTFT p50 vs worker | TPOT p50 ms | p99 | frontend | CPU (cores) | RSS MiB | client CPU | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    skipped = []
    for name, label in TARGET_LABELS.items():
        target = targets.get(name)
        if target is None:
            continue
        if target.get("status") != "ok":
            skipped.append(f"- {label}: {target.get('status')}")
            continue
        frontend = target.get("frontend", "")
        for level in target["levels"]:
            c = level["concurrency"]
            base, own_worker = level_at(baseline, c), level_at(worker, c)
            ratio = (
                level["output_tokens_per_s"] / base["output_tokens_per_s"]
                if base and base["output_tokens_per_s"]
                else None
            )
            vs_base = level["ttft_ms"]["p50"] - base["ttft_ms"]["p50"] if base else None
            vs_worker = (
                level["ttft_ms"]["p50"] - own_worker["ttft_ms"]["p50"]
                if own_worker and name != "worker"
                else None
            )
            proc = level.get("processes", {}).get(frontend, {})
            client = level.get("processes", {}).get("client", {})
            rows.append(
                f"| {label} | {c} | {_f(level['requests_per_s'], 2)} | {_f(level['output_tokens_per_s'], 0)} "
                f"| {_f(ratio, 2)}{'x' if ratio is not None else ''} | {_f(level['ttft_ms']['p50'])} "
                f"| {_f(level['ttft_ms']['p90'])} | {_f(level['ttft_ms']['p99'])} | {_signed(vs_base)} "
                f"| {_signed(vs_worker)} | {_f(level['tpot_ms']['p50'], 2)} | {_f(level['tpot_ms']['p99'], 2)} "
                f"| {FRONTEND_LABELS.get(frontend, frontend)} | {_f(proc.get('cpu_cores'), 2)} "
                f"| {_f(proc.get('rss_mib'), 0)} | {_f(client.get('cpu_cores'), 2)} | {level['errors']} |"
            )
    return rows + (["", *skipped] if skipped else [])


def _overhead_section(overhead: dict[str, Any]) -> list[str]:
    if overhead.get("status") != "ok":
        return [f"Overhead micro-benchmark: {overhead.get('status')}"]
    lines = [
        f"Engine replaced by the ScriptedEngine test double (benchmark only), "
        f"{_f(overhead['tokens_per_second_per_stream'], 0)} tokens/s per stream, "
        f"{overhead['output_tokens']} tokens per request, {overhead['requests']} requests per row.",
        "",
        "| streams | worker TTFT p50 ms | p99 | via gateway p50 ms | p99 | added p50 ms | added p99 ms | gateway CPU (cores) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in overhead["latency"]:
        w, g, a = row["worker"]["ttft_ms"], row["gateway"]["ttft_ms"], row["added_ttft_ms"]
        cpu = row["gateway"]["processes"].get("gateway", {}).get("cpu_cores")
        lines.append(
            f"| {row['concurrency']} | {_f(w['p50'], 2)} | {_f(w['p99'], 2)} | {_f(g['p50'], 2)} | {_f(g['p99'], 2)} "
            f"| {_signed(a['p50'], 2)} | {_signed(a['p99'], 2)} | {_f(cpu, 2)} |"
        )
    lease = overhead["lease"]
    lines += [
        "",
        f"Scheduler lease alone (one at a time): Acquire p50 {_f(lease['acquire_ms']['p50'], 2)} ms, "
        f"p99 {_f(lease['acquire_ms']['p99'], 2)} ms; Release p50 {_f(lease['release_ms']['p50'], 2)} ms, "
        f"p99 {_f(lease['release_ms']['p99'], 2)} ms.",
        "",
    ]
    ceiling = overhead["ceiling"]
    lines += [
        f"Messages/s ceiling: the double as fast as it goes, one token per message, "
        f"{ceiling['concurrency']} streams x {ceiling['output_tokens']} tokens.",
        "",
        "| path | messages/s | relay CPU µs per message | worker CPU µs per message |",
        "|---|--:|--:|--:|",
    ]
    for name, relay in (("worker", "worker"), ("gateway", "gateway")):
        level = ceiling.get(name)
        if level:
            lines.append(
                f"| client → {'worker' if name == 'worker' else 'gateway → worker'} | {_f(level['messages_per_s'], 0)} "
                f"| {_f(level['cpu_us_per_message'], 0)} ({relay}) | {_f(level['worker_cpu_us_per_message'], 0)} |"
            )
    lines += [
        "",
        f"One gateway core relays at most ~{_f(ceiling.get('gateway_one_core_messages_per_s'), 0)} messages/s "
        "(1 / gateway CPU per message).",
    ]
    return lines


def _memory_line(memory: dict[str, Any]) -> list[str]:
    rss = ", ".join(f"{v:.1f}" for v in memory["rss_mib"])
    return [
        f"Gateway RSS after each of {len(memory['rss_mib'])} identical rounds "
        f"({memory['requests_per_round']} requests at {memory['concurrency']} streams): {rss} MiB "
        f"(before the rounds {memory['rss_before_mib']:.1f} MiB); growth first → last round "
        f"{memory['growth_mib']:+.1f} MiB (tolerance {memory['tolerance_mib']:.1f}): "
        f"{'flat' if memory['flat'] else 'GROWING'}."
    ]


def target_checks(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) for each target of the issue that this run measured."""
    checks: list[tuple[str, str, str]] = []
    overhead = results.get("overhead", {})
    if overhead.get("status") == "ok":
        for row in overhead["latency"]:
            a = row["added_ttft_ms"]
            c = row["concurrency"]
            checks.append(
                (
                    f"added TTFT gateway+scheduler vs worker (scripted, {c} streams) ≤ {ADDED_TTFT_P50_MS:g} ms p50, "
                    f"≤ {ADDED_TTFT_P99_MS:g} ms p99",
                    f"p50 {_signed(a['p50'], 2)} ms, p99 {_signed(a['p99'], 2)} ms",
                    "met" if a["p50"] <= ADDED_TTFT_P50_MS and a["p99"] <= ADDED_TTFT_P99_MS else "MISSED",
                )
            )
    targets = results.get("targets", {})
    baseline = targets.get("baseline")
    for name, tolerance in (("grpc", 0.0), ("rest", REST_TOLERANCE)):
        target = targets.get(name)
        if not target or target.get("status") != "ok" or not baseline or baseline.get("status") != "ok":
            continue
        for c in THROUGHPUT_LEVELS:
            mine, base = level_at(target, c), level_at(baseline, c)
            if not mine or not base or not base["output_tokens_per_s"]:
                continue
            ratio = mine["output_tokens_per_s"] / base["output_tokens_per_s"]
            goal = "≥ vllm serve" if tolerance == 0 else f"within {tolerance:.0%} of vllm serve"
            checks.append(
                (
                    f"{TARGET_LABELS[name]} output tok/s at {c} streams {goal}",
                    f"{ratio:.2f}x ({_f(mine['output_tokens_per_s'], 0)} vs {_f(base['output_tokens_per_s'], 0)})",
                    "met" if ratio >= 1.0 - tolerance else f"MISSED by {1.0 - tolerance - ratio:.0%}",
                )
            )
    memory = results.get("memory")
    if memory:
        checks.append(
            (
                f"gateway memory flat across {len(memory['rss_mib'])} rounds",
                f"{memory['growth_mib']:+.1f} MiB",
                "met" if memory["flat"] else "MISSED",
            )
        )
    return checks


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    engine = meta.get("engine", {})
    load = meta.get("load", {})
    lines = [
        f"# llmesh bench — {meta.get('started', '')}",
        "",
        f"- command: `{meta.get('command', '')}`",
        f"- machine: {meta.get('machine', {}).get('summary', '')}",
    ]
    if results.get("targets"):
        lines += [
            f"- engine (every target): {engine.get('served_name')} at {engine.get('model_dir')}, max_model_len "
            f"{engine.get('max_model_len')}, max_num_seqs {engine.get('max_num_seqs')}, KV cache "
            f"{engine.get('kv_cache_gb')} GiB, dtype {engine.get('dtype')}, enforce_eager {engine.get('enforce_eager')}",
            f"- load: prompt ~{load.get('prompt_tokens_measured') or load.get('prompt_tokens')} tokens (chat "
            f"template included), {load.get('output_tokens')} output tokens with ignore_eos, closed loop, "
            f"requests per level {load.get('requests')}",
            "",
            "## Throughput and latency",
            "",
            *_throughput_table(results),
            "",
            "TTFT: request sent → first message carrying output. TPOT: (last token - first token) / (tokens - 1). "
            "CPU: the frontend process alone (engine core excluded), busy cores over the level's wall time; "
            "RSS after the level; client CPU: the load generator (same machine).",
        ]
    if results.get("memory"):
        lines += ["", "## Gateway memory", "", *_memory_line(results["memory"])]
    if "overhead" in results:
        lines += ["", "## Platform overhead (engine taken out)", "", *_overhead_section(results["overhead"])]
    checks = target_checks(results)
    if checks:
        lines += ["", "## Targets", "", "| goal | measured | verdict |", "|---|---|---|"]
        lines += [f"| {goal} | {measured} | {verdict} |" for goal, measured, verdict in checks]
    return "\n".join(lines) + "\n"
