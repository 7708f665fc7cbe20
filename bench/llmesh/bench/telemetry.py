"""The `telemetry` target: what metrics and tracing cost, in tokens/s and time to first token.

The same llmesh REST target (`llmesh up`'s stack, one vLLM worker, Envoy, vLLM's own client) runs
twice in one bench run, one stack at a time:

- `off`: `monitoring.metrics_enabled: false` (no `/metrics` side port) and no OTLP endpoint (no
  tracer provider, no tracing interceptor, no Envoy tracer);
- `on`: every process's `/metrics` served and scraped every `SCRAPE_INTERVAL_S` (as Prometheus
  would), and traces from Envoy and every service exported over OTLP/gRPC to a real collector
  running in this process (`otlp_collector`).

In-process metric updates (the gRPC interceptors' counters, the worker's per-chunk histogram) run in
both: `metrics_enabled` turns off the side port, not the counting, so `off` is "not served, not
scraped, not traced", and the ratio is the cost of serving and scraping metrics plus tracing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import httpx

from llmesh.bench.otlp_collector import OtlpCollector, start_collector
from llmesh.bench.procs import ProcessMeter
from llmesh.bench.report import frontend_cpu, level_at
from llmesh.bench.run import LLMESH_FRONTEND, print_level, say, vllm_level, vllm_load
from llmesh.bench.settings import BenchSettings
from llmesh.bench.targets import LlmeshStack, vllm_model_entry, write_llmesh_config

log = logging.getLogger(__name__)

VARIANTS = ("off", "on")
SCRAPE_INTERVAL_S = 5.0
# Envoy and the SDK export in batches about every 5 s: how long to wait for the edge's spans.
EXPORT_WAIT_S = 15.0


def monitoring_of(variant: str, collector: str) -> dict[str, Any]:
    """The config's `monitoring` section for a variant."""
    if variant == "off":
        return {"metrics_enabled": False, "otlp_endpoint": ""}
    return {"metrics_enabled": True, "otlp_endpoint": f"http://{collector}"}


async def _scrape_forever(urls: list[str], counts: dict[str, int]) -> None:
    """GET every `/metrics` URL every SCRAPE_INTERVAL_S, counting successful scrapes."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            for url in urls:
                try:
                    response = await client.get(url)
                    if response.status_code == 200:
                        counts["ok"] = counts.get("ok", 0) + 1
                except httpx.HTTPError:
                    counts["failed"] = counts.get("failed", 0) + 1
            await asyncio.sleep(SCRAPE_INTERVAL_S)


def _metrics_urls(stack: LlmeshStack) -> list[str]:
    from llmesh.cli.up import metrics_urls

    return [url for name, url in metrics_urls(stack.stack, "127.0.0.1") if not name.startswith("envoy")]


async def _edge_spans_arrived(collector: OtlpCollector) -> bool:
    """Wait up to EXPORT_WAIT_S for spans from Envoy (exported only every few seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EXPORT_WAIT_S
    while "llmesh-edge" not in collector.by_service():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _variant(
    settings: BenchSettings,
    run_dir: Path,
    variant: str,
    collector: OtlpCollector,
    address: str,
    model: dict[str, Any],
) -> dict[str, Any]:
    """One stack with the variant's monitoring, every concurrency level through REST."""
    config = write_llmesh_config(
        run_dir / "llmesh.yaml",
        [model],
        [{"worker_id": "worker-0"}],
        monitoring=monitoring_of(variant, address),
    )
    stack = LlmeshStack(run_dir, config)
    result: dict[str, Any] = {"status": "ok", "frontend": LLMESH_FRONTEND, "levels": []}
    scraper: asyncio.Task[None] | None = None
    scrapes: dict[str, int] = {}
    try:
        say(f"telemetry {variant}: starting the llmesh stack")
        await asyncio.to_thread(stack.start)
        pids = stack.pids()
        pids["worker"] = pids.pop("worker-0")
        meter = ProcessMeter(pids)
        urls = _metrics_urls(stack)
        result["metrics_urls"] = len(urls)
        if variant == "on":
            scraper = asyncio.create_task(_scrape_forever(urls, scrapes))
        for concurrency in settings.load.concurrency:
            load = vllm_load(settings, f"http://{stack.envoy}", concurrency)
            level = await vllm_level(
                f"telemetry-{variant}-c{concurrency}", load, meter, run_dir / "vllm-client"
            )
            result["levels"].append(level)
            print_level(f"tel-{variant}", level, LLMESH_FRONTEND)
        if variant == "on" and not await _edge_spans_arrived(collector):
            raise RuntimeError(f"no span from Envoy reached the collector within {EXPORT_WAIT_S:.0f} s")
    except Exception as error:
        log.exception("telemetry %s failed", variant)
        result["status"] = f"failed: {type(error).__name__}: {str(error)[:1500]}"
    finally:
        if scraper is not None:
            scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scraper
        result["scrapes"] = scrapes
        say(f"telemetry {variant}: stopping the stack")
        await asyncio.to_thread(stack.stop)
    return result


def ratios(off: dict[str, Any], on: dict[str, Any]) -> list[dict[str, Any]]:
    """Per concurrency level: on / off for output tok/s and TTFT p50 and p99, and the frontend's
    CPU per output token off and on (steadier than tok/s on a shared machine: it does not depend
    on how much CPU the other tenants left)."""
    out = []
    for level_off in off.get("levels", []):
        level_on = level_at(on, level_off["concurrency"])
        if level_on is None:
            continue

        def ratio(mine: float | None, base: float | None) -> float | None:
            return mine / base if mine is not None and base else None

        out.append(
            {
                "concurrency": level_off["concurrency"],
                "tok_s_on_off": ratio(level_on["output_tokens_per_s"], level_off["output_tokens_per_s"]),
                "ttft_p50_on_off": ratio(level_on["ttft_ms"]["p50"], level_off["ttft_ms"]["p50"]),
                "ttft_p99_on_off": ratio(level_on["ttft_ms"]["p99"], level_off["ttft_ms"]["p99"]),
                "frontend_cpu_us_per_token_off": frontend_cpu(level_off, LLMESH_FRONTEND)[1],
                "frontend_cpu_us_per_token_on": frontend_cpu(level_on, LLMESH_FRONTEND)[1],
            }
        )
    return out


async def run_telemetry(
    settings: BenchSettings, run_dir: Path, model: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Both variants, off first, then the ratios; the collector counts the spans it received.
    `model`: the catalog entry the worker serves (default: vLLM on the bench's engine settings;
    the smoke test passes the scripted double's)."""
    model = model or vllm_model_entry(settings.engine)
    collector, server, address = await start_collector()
    result: dict[str, Any] = {"collector": address}
    try:
        for variant in VARIANTS:
            before = len(collector.spans)
            result[variant] = await _variant(settings, run_dir / variant, variant, collector, address, model)
            result[variant]["spans_received"] = len(collector.spans) - before
        result["spans_by_service"] = collector.by_service()
    finally:
        await server.stop(None)
    failed = [f"{v}: {result[v]['status']}" for v in VARIANTS if result[v]["status"] != "ok"]
    if not failed and not result["on"]["spans_received"]:
        failed.append("on: the collector received no span (tracing did not run)")
    if not failed and result["off"]["spans_received"]:
        failed.append(f"off: the collector received {result['off']['spans_received']} spans")
    result["status"] = f"failed: {'; '.join(failed)}" if failed else "ok"
    result["ratios"] = ratios(result["off"], result["on"])
    for r in result["ratios"]:
        say(
            f"telemetry c={r['concurrency']}: tok/s on/off {_x(r['tok_s_on_off'])}, "
            f"TTFT p50 on/off {_x(r['ttft_p50_on_off'])}, p99 {_x(r['ttft_p99_on_off'])}, frontend CPU "
            f"{r['frontend_cpu_us_per_token_off']:.0f} -> {r['frontend_cpu_us_per_token_on']:.0f} µs/token"
        )
    return result


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def telemetry_section(result: dict[str, Any]) -> list[str]:
    """The report's table: each level off and on, and the ratios."""
    if result.get("status") != "ok":
        return [f"Telemetry cost: {result.get('status')}"]
    lines = [
        "The llmesh REST target twice, one stack at a time, off first: `off` = no `/metrics` side port, no "
        "tracing; `on` = every process's `/metrics` served and scraped every "
        f"{SCRAPE_INTERVAL_S:.0f} s, traces from Envoy and every service exported over OTLP/gRPC to a "
        f"collector in the bench process ({result['on']['spans_received']} spans received). In-process "
        "metric updates run in both. Frontend CPU: µs of CPU per output token of the worker process, "
        "Envoy, scheduler, registry and auth together (engine core excluded).",
        "",
        "| streams | tok/s off | tok/s on | on/off | TTFT p50 off / on ms | TTFT p99 off / on ms "
        "| frontend CPU µs/token off / on | failed off / on |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["ratios"]:
        c = r["concurrency"]
        off, on = level_at(result["off"], c), level_at(result["on"], c)
        assert off is not None and on is not None  # ratios exist only for levels both have
        lines.append(
            f"| {c} | {off['output_tokens_per_s']:,.0f} | {on['output_tokens_per_s']:,.0f} | "
            f"{_x(r['tok_s_on_off'])} | {off['ttft_ms']['p50']:.1f} / {on['ttft_ms']['p50']:.1f} | "
            f"{off['ttft_ms']['p99']:.1f} / {on['ttft_ms']['p99']:.1f} | "
            f"{r['frontend_cpu_us_per_token_off']:,.0f} / {r['frontend_cpu_us_per_token_on']:,.0f} | "
            f"{off['failed']} / {on['failed']} |"
        )
    return lines
