"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmesh.bench.report import TARGET_LABELS


def _pyplot() -> Any:
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok_targets(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    targets = results.get("targets", {})
    return [(n, targets[n]) for n in TARGET_LABELS if n in targets and targets[n].get("status") == "ok"]


def _ecdf(ax: Any, values: list[float], label: str) -> None:
    ordered = sorted(values)
    if not ordered:
        return
    ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
    ax.step(ordered, ys, where="post", label=label)


def _log_ms_axis(ax: Any) -> None:
    """Log scale with plain millisecond labels on the major ticks only."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_throughput(results: dict[str, Any], path: Path) -> Path | None:
    targets = _ok_targets(results)
    if not targets:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, target in targets:
        xs = [level["concurrency"] for level in target["levels"]]
        ys = [level["output_tokens_per_s"] for level in target["levels"]]
        ax.plot(xs, ys, marker="o", label=TARGET_LABELS[name])
    ax.set_xscale("log", base=2)
    levels = sorted({level["concurrency"] for _, t in targets for level in t["levels"]})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput vs concurrency (same engine, same run)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ttft(results: dict[str, Any], path: Path) -> Path | None:
    targets = _ok_targets(results)
    if not targets:
        return None
    levels = sorted({level["concurrency"] for _, t in targets for level in t["levels"]})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4.2), squeeze=False)
    for ax, concurrency in zip(axes[0], levels, strict=True):
        for name, target in targets:
            for level in target["levels"]:
                if level["concurrency"] == concurrency:
                    _ecdf(ax, level["raw"]["ttft_ms"], TARGET_LABELS[name])
        _log_ms_axis(ax)
        ax.set_xlabel("time to first token (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{concurrency} streams")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("TTFT distribution per target (CDF)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_overhead(results: dict[str, Any], path: Path) -> Path | None:
    overhead = results.get("overhead", {})
    if overhead.get("status") != "ok":
        return None
    rows = overhead["latency"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4.2), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        _ecdf(ax, row["worker"]["raw"]["ttft_ms"], "worker directly")
        _ecdf(ax, row["gateway"]["raw"]["ttft_ms"], "gateway → scheduler → worker")
        ax.set_xlabel("time to first token (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"scripted double, {row['concurrency']} streams")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Added latency of the platform (engine replaced by the scripted double)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    made = [
        plot_throughput(results, out_dir / "throughput.png"),
        plot_ttft(results, out_dir / "ttft.png"),
        plot_overhead(results, out_dir / "overhead_ttft.png"),
    ]
    return [p for p in made if p is not None]
