"""Results as JSON (every raw number) and as a Markdown report with ratios against `vllm serve`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmesh.bench.procs import FLAT_TOLERANCE_FRACTION, FLAT_TOLERANCE_MIB

TARGET_LABELS = {
    "baseline": "vllm serve",
    "baseline-nice": "vllm serve, engine at nice 10",
    "rest": "llmesh REST via Envoy",
    "grpc": "llmesh gRPC via Envoy",
}
PROCESS_LABELS = {
    "vllm_api_server": "vLLM API server",
    "worker": "worker",
    "envoy": "Envoy",
    "scheduler": "scheduler",
    "registry": "registry",
    "auth": "auth",
}
# Targets of issue 7.
ADDED_TTFT_P50_MS = 1.0
ADDED_TTFT_P99_MS = 3.0
TPOT_TOLERANCE = 0.10
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


def _ratio(mine: Any, base: Any) -> float | None:
    if mine is None or base is None or not base or not math.isfinite(mine) or not math.isfinite(base):
        return None
    return float(mine) / float(base)


# A TPOT p50 below this means the tokens reached the client in one burst (vLLM's server when its
# engine starves it of CPU): no per-token pace to compare against.
BURST_TPOT_MS = 0.05


def _tpot_ratio(mine: Any, base: Any) -> float | None:
    if base is not None and math.isfinite(base) and base < BURST_TPOT_MS:
        return None
    return _ratio(mine, base)


def level_at(target: dict[str, Any] | None, concurrency: int) -> dict[str, Any] | None:
    for level in (target or {}).get("levels", []):
        if level["concurrency"] == concurrency:
            return level
    return None


def ok_targets(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    targets = results.get("targets", {})
    return [(n, targets[n]) for n in TARGET_LABELS if n in targets and targets[n].get("levels")]


def frontend_cpu(level: dict[str, Any], frontend: list[str]) -> tuple[float, float]:
    """(cores, µs per output token) of the target's frontend processes together (engine core excluded)."""
    procs = level.get("processes", {})
    cores = sum(procs.get(n, {}).get("cpu_cores", 0.0) for n in frontend)
    per_token = sum(procs.get(n, {}).get("cpu_us_per_token", 0.0) for n in frontend)
    return (cores, per_token) if procs else (math.nan, math.nan)


def engine_core_cpu(level: dict[str, Any], owner: str) -> float:
    proc = level.get("processes", {}).get(owner)
    if not proc:
        return math.nan
    return float(proc["tree_cpu_cores"] - proc["cpu_cores"])


def _throughput_table(results: dict[str, Any]) -> list[str]:
    baseline = results.get("targets", {}).get("baseline")
    rows = [
        "| target | streams | requests | output tok/s | vs vllm | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
        "| TPOT vs vllm | ITL p50 ms | ITL p99 ms | tokens/chunk | failed |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, target in ok_targets(results):
        for level in target["levels"]:
            base = level_at(baseline, level["concurrency"])
            ratio = _ratio(level["output_tokens_per_s"], base and base["output_tokens_per_s"])
            tpot = _tpot_ratio(level["tpot_ms"]["p50"], base and base["tpot_ms"]["p50"])
            rows.append(
                f"| {TARGET_LABELS[name]} | {level['concurrency']} | {level['completed'] + level['failed']} "
                f"| {_f(level['output_tokens_per_s'], 0)} | {_f(ratio, 2)}{'x' if ratio else ''} "
                f"| {_f(level['ttft_ms']['p50'])} | {_f(level['ttft_ms']['p99'])} | {_f(level['tpot_ms']['p50'], 2)} "
                f"| {'-' if tpot is None else f'{(tpot - 1) * 100:+.0f} %'} | {_f(level['itl_ms']['p50'], 2)} "
                f"| {_f(level['itl_ms']['p99'], 2)} | {_f(level['tokens_per_chunk'], 2)} | {level['failed']} |"
            )
    failed = [
        f"- {TARGET_LABELS.get(n, n)}: {t.get('status')}"
        for n, t in results.get("targets", {}).items()
        if t.get("status") != "ok"
    ]
    return rows + (["", *failed] if failed else [])


CPU_COLUMNS = ("vllm_api_server", "worker", "envoy", "scheduler", "registry", "auth")


def _cpu_table(results: dict[str, Any]) -> list[str]:
    rows = [
        "| target | streams | frontend cores | frontend µs/token | "
        + " | ".join(PROCESS_LABELS[c] for c in CPU_COLUMNS)
        + " | engine core cores | load client cores |",
        "|---|--:|--:|--:|" + "--:|" * len(CPU_COLUMNS) + "--:|--:|",
    ]
    for name, target in ok_targets(results):
        frontend = target.get("frontend", [])
        owner = "vllm_api_server" if name.startswith("baseline") else "worker"
        for level in target["levels"]:
            procs = level.get("processes", {})
            cores, per_token = frontend_cpu(level, frontend)
            cells = []
            for column in CPU_COLUMNS:
                proc = procs.get(column)
                cells.append(
                    f"{proc['cpu_cores']:.2f} ({proc['cpu_us_per_token']:.0f})"
                    if proc and column in frontend
                    else ""
                )
            client = procs.get("client", {}).get("cpu_cores")
            rows.append(
                f"| {TARGET_LABELS[name]} | {level['concurrency']} | {_f(cores, 2)} | {_f(per_token, 0)} | "
                + " | ".join(cells)
                + f" | {_f(engine_core_cpu(level, owner), 2)} | {_f(client, 2)} |"
            )
    return rows


def _overhead_section(overhead: dict[str, Any]) -> list[str]:
    if overhead.get("status") != "ok":
        return [f"Picker overhead: {overhead.get('status')}"]
    cpu = overhead.get("cpu_us_per_request_via", {})
    rows = [("worker directly", overhead["direct"]["ttft_ms"])]
    if "envoy_without_picker" in overhead:
        rows.append(("Envoy without the picker → worker", overhead["envoy_without_picker"]["ttft_ms"]))
    rows.append(("Envoy → picker (ext_proc + lease) → worker", overhead["via"]["ttft_ms"]))
    lines = [
        f"Engine replaced by the ScriptedEngine test double (benchmark only, "
        f"{_f(overhead['tokens_per_second_per_stream'], 0)} tokens/s, {overhead['output_tokens']} tokens per "
        f"request); one stream, {overhead['requests']} requests per path, the paths alternating in blocks of "
        f"{overhead['block']}; the same native gRPC client.",
        "",
        "| path | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms |",
        "|---|--:|--:|--:|",
        *(f"| {label} | {_f(t['p50'], 2)} | {_f(t['p90'], 2)} | {_f(t['p99'], 2)} |" for label, t in rows),
    ]
    picker = overhead.get("picker_added_ttft_ms")
    if picker:
        lines.append(_gap_row("**added by the picker** (with it minus without it)", picker))
    lines.append(_gap_row("added by the edge (Envoy + picker minus directly)", overhead["added_ttft_ms"]))
    wait = overhead.get("picker_wait_ms")
    if wait:
        lines.append(
            f"| the picker's answer as Envoy waited for it (access log `picker_us`) | {wait['p50']:.2f} | "
            f"{wait['p90']:.2f} | {wait['p99']:.2f} |"
        )
    return [
        *lines,
        "",
        "CPU per request on the Envoy path: "
        + ", ".join(f"{PROCESS_LABELS.get(k, k)} {_f(us, 0)} µs" for k, us in cpu.items())
        + ".",
    ]


def _gap_row(label: str, ms: dict[str, float]) -> str:
    return f"| {label} | {ms['p50']:+.2f} | {ms['p90']:+.2f} | {ms['p99']:+.2f} |"


def _soak_section(soak: dict[str, Any]) -> list[str]:
    lines = [
        f"{len(soak.get('rounds', []))} rounds of {soak['requests_per_round']} {soak['path']} requests at "
        f"{soak['concurrency']} streams through Envoy (status: {soak.get('status')}).",
        "",
    ]
    rounds = soak.get("rounds", [])
    if not rounds:
        return lines
    memory = soak.get("memory", {})
    names = list(memory)
    lines += _rss_table_head(["round", "ok", "failed", "Envoy 5xx", "upstream 503", "output tok/s"], names)
    for i, r in enumerate(rounds):
        series = [memory[n]["rss_mib"] for n in names]
        lines.append(
            f"| {r['round']} | {r['completed']} | {r['failed']} | {r['envoy_5xx']} | {r['envoy_503']} "
            f"| {_f(r['output_tokens_per_s'], 0)} | "
            + " | ".join(_f(s[i] if i < len(s) else None, 1) for s in series)
            + " |"
        )
    if memory:
        growth = ", ".join(
            f"{_process_label(n)} {m['growth_mib']:+.1f}{'' if m['flat'] else ' (GROWING)'}"
            for n, m in memory.items()
        )
        lines += [
            "",
            f"RSS growth first → last round (MiB; `engine`: the worker's vLLM engine processes): {growth}.",
        ]
    examples = sorted({e for r in rounds for e in r.get("error_examples", [])})
    if examples:
        lines += ["", "Failures seen: " + "; ".join(examples[:5])]
    return lines + _soak_reference(soak.get("vllm_serve"))


def _rss_table_head(columns: list[str], names: list[str]) -> list[str]:
    """A soak table's header: `columns`, then one RSS column per process in `names`."""
    cells = [*columns, *(f"{_process_label(n)} RSS MiB" for n in names)]
    return ["| " + " | ".join(cells) + " |", "|" + "--:|" * len(cells)]


def _process_label(name: str) -> str:
    """A process's label; `<name> engine` (its engine processes) labelled after it."""
    base, engine = name.removesuffix(" engine"), name.endswith(" engine")
    return PROCESS_LABELS.get(base, base) + (" engine" if engine else "")


def _soak_reference(baseline: dict[str, Any] | None) -> list[str]:
    """The same rounds against vllm serve: its API server's and its engine's RSS, for reference."""
    if not baseline:
        return []
    lines = ["", f"The same rounds against `vllm serve` (status: {baseline.get('status')}):", ""]
    memory = baseline.get("memory", {})
    if not memory:
        return lines
    names = list(memory)
    lines += _rss_table_head(["round", "ok", "failed", "output tok/s"], names)
    for i, r in enumerate(baseline["rounds"]):
        lines.append(
            f"| {r['round']} | {r['completed']} | {r['failed']} | {_f(r['output_tokens_per_s'], 0)} | "
            + " | ".join(_f(memory[n]["rss_mib"][i], 1) for n in names)
            + " |"
        )
    growth = ", ".join(f"{_process_label(n)} {m['growth_mib']:+.1f}" for n, m in memory.items())
    return [*lines, "", f"RSS growth first → last round (MiB): {growth}."]


def target_checks(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) for each target of issue 7 that this run measured."""
    checks: list[tuple[str, str, str]] = []
    targets = results.get("targets", {})
    baseline = targets.get("baseline")
    rest = targets.get("rest")
    for c in THROUGHPUT_LEVELS:
        mine, base = level_at(rest, c), level_at(baseline, c)
        if not mine or not base:
            continue
        ratio = _ratio(mine["output_tokens_per_s"], base["output_tokens_per_s"])
        if ratio is not None:
            checks.append(
                (
                    f"REST via Envoy output tok/s at {c} streams ≥ 1.0x vllm serve",
                    f"{ratio:.3f}x ({_f(mine['output_tokens_per_s'], 0)} vs {_f(base['output_tokens_per_s'], 0)})",
                    # One decimal: a miss under 1 % would read "MISSED by 0%".
                    "met" if ratio >= 1.0 else f"MISSED by {1.0 - ratio:.1%}",
                )
            )
        tpot = _tpot_ratio(mine["tpot_ms"]["p50"], base["tpot_ms"]["p50"])
        if tpot is not None:
            checks.append(
                (
                    f"REST via Envoy TPOT p50 at {c} streams ≤ vllm serve +{TPOT_TOLERANCE:.0%}",
                    f"{_f(mine['tpot_ms']['p50'], 2)} vs {_f(base['tpot_ms']['p50'], 2)} ms ({(tpot - 1) * 100:+.0f} %)",
                    "met" if tpot <= 1.0 + TPOT_TOLERANCE else "MISSED",
                )
            )
    # The same goals against vLLM's server with its engine niced as llmesh's worker nices its own:
    # a reference that separates the platform's cost from that OS setting.
    niced = targets.get("baseline-nice")
    for c in THROUGHPUT_LEVELS:
        mine, base = level_at(rest, c), level_at(niced, c)
        ratio = _ratio(mine and mine["output_tokens_per_s"], base and base["output_tokens_per_s"])
        tpot = _tpot_ratio(mine and mine["tpot_ms"]["p50"], base and base["tpot_ms"]["p50"])
        if mine and base and ratio is not None and tpot is not None:
            checks.append(
                (
                    f"(reference) REST via Envoy at {c} streams vs vllm serve with its engine at nice 10",
                    f"{ratio:.2f}x tok/s ({_f(mine['output_tokens_per_s'], 0)} vs "
                    f"{_f(base['output_tokens_per_s'], 0)}), TPOT p50 {(tpot - 1) * 100:+.0f} %",
                    "met" if ratio >= 1.0 and tpot <= 1.0 + TPOT_TOLERANCE else "below",
                )
            )
    for name in ("rest", "grpc"):
        target = targets.get(name)
        if target and target.get("levels"):
            failed = sum(level["failed"] for level in target["levels"])
            checks.append(
                (
                    f"{TARGET_LABELS[name]}: zero failed requests",
                    str(failed),
                    "met" if failed == 0 else "MISSED",
                )
            )
    overhead = results.get("overhead", {})
    if overhead.get("status") == "ok":
        limits = f"≤ {ADDED_TTFT_P50_MS:g} ms p50, ≤ {ADDED_TTFT_P99_MS:g} ms p99"
        picker = overhead.get("picker_added_ttft_ms")
        if picker:
            checks.append(
                _latency_check(f"picker's added TTFT (ext_proc + lease) at 1 stream {limits}", picker)
            )
        # The stricter reading: everything the edge adds, Envoy's own hop included.
        checks.append(
            _latency_check(
                f"edge's added TTFT (Envoy + picker) vs the worker directly {limits}",
                overhead["added_ttft_ms"],
            )
        )
    soak = results.get("soak")
    if soak and soak.get("rounds"):
        rounds = soak["rounds"]
        n503 = sum(r["envoy_503"] for r in rounds) + sum(
            1 for r in rounds for e in r.get("error_examples", []) if "503" in e or "Unavailable" in e
        )
        failed = sum(r["failed"] for r in rounds)
        flat = all(m["flat"] for m in soak.get("memory", {}).values())
        what = f"{len(rounds)} x {soak['requests_per_round']} requests at {soak['concurrency']} streams"
        checks.append((f"soak {what}: zero 503s", str(n503), "met" if n503 == 0 else "MISSED"))
        checks.append((f"soak {what}: zero failures", str(failed), "met" if failed == 0 else "MISSED"))
        checks.append((f"soak {what}: flat RSS of every process", "see above", "met" if flat else "MISSED"))
        engine = _engine_growth(soak.get("memory", {}))
        reference = _engine_growth((soak.get("vllm_serve") or {}).get("memory", {}))
        if engine is not None and reference is not None:
            # Not a goal of its own: whether an engine that grows grows as vLLM's own server's does
            # (beyond it by no more than the tolerance a flat series has).
            (growth, first), (ref_growth, _) = engine, reference
            within = growth - ref_growth <= max(FLAT_TOLERANCE_MIB, FLAT_TOLERANCE_FRACTION * first)
            checks.append(
                (
                    f"(reference) soak {what}: engine RSS growth vs vllm serve's engine, same rounds",
                    f"{growth:+.0f} vs {ref_growth:+.0f} MiB",
                    "as vllm serve's" if within else "above vllm serve's",
                )
            )
    return checks


def _engine_growth(memory: dict[str, Any]) -> tuple[float, float] | None:
    """The engine series' (`<process> engine`) summed RSS growth and first-round RSS, in MiB; None
    when there are none."""
    engines = [m for name, m in memory.items() if name.endswith(" engine")]
    if not engines:
        return None
    return sum(m["growth_mib"] for m in engines), sum(m["rss_mib"][0] for m in engines)


def _latency_check(what: str, ms: dict[str, float]) -> tuple[str, str, str]:
    met = ms["p50"] <= ADDED_TTFT_P50_MS and ms["p99"] <= ADDED_TTFT_P99_MS
    shown = f"p50 {ms['p50']:+.2f} ms, p99 {ms['p99']:+.2f} ms"
    return (what, shown, "met" if met else "MISSED")


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
            f"- engine (every target, one at a time): {engine.get('served_name')} at {engine.get('model_dir')}, "
            f"max_model_len {engine.get('max_model_len')}, max_num_seqs {engine.get('max_num_seqs')}, KV cache "
            f"{engine.get('kv_cache_gb')} GiB, dtype {engine.get('dtype')}, enforce_eager {engine.get('enforce_eager')}, "
            f"seed {engine.get('seed')}",
            f"- load: vLLM's serving benchmark client (`vllm.benchmarks.serve`, openai-chat, random dataset, "
            f"{load.get('input_len')} input / {load.get('output_len')} output tokens, ignore_eos, seed "
            f"{load.get('seed')}) for `vllm serve` and REST; llmesh's gRPC client with the same prompts for gRPC; "
            f"requests per level {load.get('requests')}",
            "",
            "## Throughput and latency",
            "",
            *_throughput_table(results),
            "",
            "TTFT: request sent → first chunk carrying a choice. ITL: time between chunks. TPOT: per request, "
            "(last chunk - first chunk) / (output tokens - 1). All as vLLM's client computes them. TPOT vs "
            f"vllm is '-' where vllm serve's TPOT p50 is below {BURST_TPOT_MS} ms: its tokens came in one burst.",
            "",
            "## Frontend CPU per process",
            "",
            *_cpu_table(results),
            "",
            "Cells: busy cores over the measured run (µs of CPU per streamed output token). Frontend: every "
            "process but the engine core (vLLM's API server process; or the llmesh worker process, Envoy, scheduler, "
            "registry, auth). Engine core: the engine processes under the API server or the worker. Load client: "
            "vLLM's client process, or this process for gRPC; it shares the machine.",
        ]
    if "overhead" in results:
        lines += ["", "## Picker overhead (engine taken out)", "", *_overhead_section(results["overhead"])]
    if "soak" in results:
        lines += ["", "## Soak", "", *_soak_section(results["soak"])]
    if "telemetry" in results:
        from llmesh.bench.telemetry import telemetry_section

        lines += [
            "",
            "## Telemetry cost (metrics and tracing on vs off)",
            "",
            *telemetry_section(results["telemetry"]),
        ]
    if "auth_latency" in results:
        from llmesh.bench.auth_latency import auth_latency_section

        lines += [
            "",
            "## ext_authz latency (auth on vs off)",
            "",
            *auth_latency_section(results["auth_latency"]),
        ]
    checks = target_checks(results)
    if checks:
        lines += ["", "## Targets (issue 7)", "", "| goal | measured | verdict |", "|---|---|---|"]
        lines += [f"| {goal} | {measured} | {verdict} |" for goal, measured, verdict in checks]
    return "\n".join(lines) + "\n"
