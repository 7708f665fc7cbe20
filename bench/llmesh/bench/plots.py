"""PNG plots of a run (matplotlib, Agg backend: no display needed), and the README snippet.

- `throughput.png`: output tokens/s per concurrency, one bar per target;
- `latency.png`: TTFT and ITL per concurrency, bars at p50, whiskers to p99;
- `cpu.png`: frontend CPU per streamed token, per process, stacked.

`publish` copies them to bench/plots/ with `README-snippet.md`, which the top README includes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from llmesh.bench.report import PROCESS_LABELS, TARGET_LABELS, _f, _ratio, frontend_cpu, level_at, ok_targets

COLORS = {"baseline": "#7f7f7f", "baseline-nice": "#bcbcbc", "rest": "#1f77b4", "grpc": "#2ca02c"}
PLOTS = ("throughput.png", "latency.png", "cpu.png")


def _pyplot() -> Any:
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _levels(targets: list[tuple[str, dict[str, Any]]]) -> list[int]:
    return sorted({level["concurrency"] for _, t in targets for level in t["levels"]})


def _bars(
    ax: Any, targets: list[tuple[str, dict[str, Any]]], levels: list[int], value: Any, whisker: Any = None
) -> None:
    width = 0.8 / max(1, len(targets))
    for i, (name, target) in enumerate(targets):
        xs, ys, tops = [], [], []
        for j, c in enumerate(levels):
            level = level_at(target, c)
            if level is None:
                continue
            y = value(level)
            if y is None or not math.isfinite(y):
                continue
            xs.append(j + (i - (len(targets) - 1) / 2) * width)
            ys.append(y)
            tops.append(whisker(level) if whisker else y)
        ax.bar(xs, ys, width * 0.95, label=TARGET_LABELS[name], color=COLORS.get(name))
        if whisker:
            err = [[0.0] * len(ys), [max(0.0, t - y) for t, y in zip(tops, ys, strict=True)]]
            ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.set_xticks(range(len(levels)), [f"{c} stream{'s' if c > 1 else ''}" for c in levels])
    ax.grid(True, axis="y", alpha=0.3)


def plot_throughput(results: dict[str, Any], path: Path) -> Path | None:
    targets = ok_targets(results)
    if not targets:
        return None
    plt = _pyplot()
    levels = _levels(targets)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    _bars(ax, targets, levels, lambda level: level["output_tokens_per_s"])
    baseline = results.get("targets", {}).get("baseline")
    for i, (name, target) in enumerate(targets):
        if name.startswith("baseline"):
            continue
        for j, c in enumerate(levels):
            mine, base = level_at(target, c), level_at(baseline, c)
            ratio = _ratio(mine and mine["output_tokens_per_s"], base and base["output_tokens_per_s"])
            if mine and ratio is not None:
                x = j + (i - (len(targets) - 1) / 2) * (0.8 / len(targets))
                ax.annotate(
                    f"{ratio:.2f}x", (x, mine["output_tokens_per_s"]), ha="center", va="bottom", fontsize=8
                )
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput (same engine, same run; ratio vs vllm serve)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(results: dict[str, Any], path: Path) -> Path | None:
    targets = ok_targets(results)
    if not targets:
        return None
    plt = _pyplot()
    levels = _levels(targets)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in (
        (axes[0], "ttft_ms", "time to first token"),
        (axes[1], "itl_ms", "inter-token latency"),
    ):
        _bars(
            ax,
            targets,
            levels,
            lambda level, m=metric: level[m]["p50"],
            lambda level, m=metric: level[m]["p99"],
        )
        ax.set_yscale("log")
        ax.set_ylabel("ms (bar p50, whisker p99; log scale)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cpu(results: dict[str, Any], path: Path) -> Path | None:
    targets = [(n, t) for n, t in ok_targets(results) if any(lv.get("processes") for lv in t["levels"])]
    if not targets:
        return None
    plt = _pyplot()
    levels = _levels(targets)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    labels, xs = [], []
    colors = dict(
        zip(PROCESS_LABELS, ("#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"), strict=True)
    )
    seen: set[str] = set()
    x = 0.0
    for c in levels:
        for name, target in targets:
            level = level_at(target, c)
            if level is None or not level.get("processes"):
                continue
            bottom = 0.0
            for proc in target.get("frontend", []):
                us = level["processes"].get(proc, {}).get("cpu_us_per_token")
                if us is None or not math.isfinite(us):
                    continue
                label = PROCESS_LABELS[proc] if proc not in seen else None
                seen.add(proc)
                ax.bar(x, us, 0.8, bottom=bottom, color=colors.get(proc), label=label)
                bottom += us
            labels.append(f"{TARGET_LABELS[name].replace('llmesh ', '').replace(' via Envoy', '')}\n{c}")
            xs.append(x)
            x += 1
        x += 0.5
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("frontend CPU µs per output token")
    ax.set_title("Frontend CPU per streamed token (engine core excluded), per process")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    made = [
        plot_throughput(results, out_dir / "throughput.png"),
        plot_latency(results, out_dir / "latency.png"),
        plot_cpu(results, out_dir / "cpu.png"),
    ]
    return [p for p in made if p is not None]


def snippet(results: dict[str, Any], image_prefix: str) -> str:
    """Markdown for README's Performance section: the plots and the 16/64-stream numbers."""
    meta = results.get("meta", {})
    targets = results.get("targets", {})
    baseline = targets.get("baseline")
    lines = [
        f"Measured by `llmesh bench` on {meta.get('started', '?')} ({meta.get('machine', {}).get('summary', '')}); "
        f"`{meta.get('command', '')}`; requests per level (streams: requests) "
        f"{meta.get('load', {}).get('requests', '?')}. Same tiny model and engine settings for every target, "
        "engines one at a time; OpenAI-API targets measured with vLLM's own serving benchmark client. "
        "See bench/README.md.",
        "",
        "| target | streams | output tok/s | vs vllm serve | TTFT p50 / p99 ms | ITL p50 / p99 ms | frontend CPU µs/token | failed |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, target in ok_targets(results):
        for level in target["levels"]:
            base = level_at(baseline, level["concurrency"])
            ratio = _ratio(level["output_tokens_per_s"], base and base["output_tokens_per_s"])
            _, per_token = frontend_cpu(level, target.get("frontend", []))
            lines.append(
                f"| {TARGET_LABELS[name]} | {level['concurrency']} | {_f(level['output_tokens_per_s'], 0)} "
                f"| {_f(ratio, 2)}{'x' if ratio else ''} | {_f(level['ttft_ms']['p50'])} / {_f(level['ttft_ms']['p99'])} "
                f"| {_f(level['itl_ms']['p50'], 1)} / {_f(level['itl_ms']['p99'], 1)} | {_f(per_token, 0)} | {level['failed']} |"
            )
    lines += [
        "",
        f"![Throughput]({image_prefix}throughput.png)",
        f"![TTFT and ITL]({image_prefix}latency.png)",
        f"![Frontend CPU per token]({image_prefix}cpu.png)",
    ]
    return "\n".join(lines) + "\n"


def publish(
    results: dict[str, Any], out_dir: Path, publish_dir: Path, image_prefix: str = "bench/plots/"
) -> list[Path]:
    """Copy the run's plots to `publish_dir` and write README-snippet.md there."""
    publish_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PLOTS:
        if (out_dir / name).exists():
            written.append(Path(shutil.copyfile(out_dir / name, publish_dir / name)))
    path = publish_dir / "README-snippet.md"
    path.write_text(snippet(results, image_prefix))
    written.append(path)
    return written
