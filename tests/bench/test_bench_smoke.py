"""Smoke tests of the benchmark machinery (not of performance: no timing is asserted).

The load generator runs against real servers with the ScriptedEngine double (the worker alone,
the full gateway → scheduler → worker path, and a minimal OpenAI-style SSE server); the report and
plot writers run on those results; `llmesh bench --quick --targets overhead` runs end to end.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmesh.bench import plots, report
from llmesh.bench.clients import GatewayStreamClient, OpenAIStreamClient, WorkerStreamClient
from llmesh.bench.loadgen import run_level, wait_until_serving
from llmesh.bench.stats import RequestSample, percentile, summarize
from tests.scripted_stack import MODEL, engine

OUTPUT_TOKENS = 6


@dataclass
class BenchTargets:
    worker: str
    gateway: str


@pytest.fixture
async def scripted_stack(stack_factory) -> BenchTargets:
    """The shared in-process stack (tests/scripted_stack.py) with one scripted worker."""
    stack = await stack_factory({"w0": engine()})
    return BenchTargets(worker=stack.worker_addresses["w0"], gateway=stack.addresses["gateway"])


def _check_level(samples: list[RequestSample], requests: int) -> dict:
    assert len(samples) == requests
    assert all(s.ok for s in samples), [s.error for s in samples]
    assert all(s.tokens == OUTPUT_TOKENS for s in samples)
    summary = summarize(samples, max(s.done for s in samples if s.done) - min(s.sent for s in samples))
    assert summary["completed"] == requests and summary["errors"] == 0
    assert summary["output_tokens"] == requests * OUTPUT_TOKENS
    assert len(summary["raw"]["ttft_ms"]) == requests and len(summary["raw"]["tpot_ms"]) == requests
    return summary


async def test_load_generator_against_the_worker_and_the_gateway(scripted_stack: BenchTargets) -> None:
    worker = WorkerStreamClient(scripted_stack.worker, MODEL.name, "hello bench", OUTPUT_TOKENS, timeout_s=10)
    gateway = GatewayStreamClient(
        scripted_stack.gateway, MODEL.name, "hello bench", OUTPUT_TOKENS, timeout_s=10
    )
    try:
        assert await wait_until_serving(gateway, timeout_s=20) is None
        for client in (worker, gateway):
            run = await run_level(client, 1, 3, time_limit_s=30)
            assert not run.timed_out
            _check_level(run.samples, 3)
    finally:
        await worker.aclose()
        await gateway.aclose()


async def test_errors_are_recorded_not_raised(scripted_stack: BenchTargets) -> None:
    client = GatewayStreamClient(scripted_stack.gateway, "no-such-model", "hi", OUTPUT_TOKENS, timeout_s=10)
    try:
        run = await run_level(client, 2, 2, time_limit_s=10)
    finally:
        await client.aclose()
    assert len(run.samples) == 2 and all(s.error.startswith("NOT_FOUND") for s in run.samples)
    assert summarize(run.samples, run.wall_s)["errors"] == 2


async def _sse_server() -> tuple[asyncio.Server, int]:
    """A minimal OpenAI-style streaming endpoint: role chunk, one chunk per token, usage, [DONE]."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            body = json.loads(await reader.readexactly(length))
            events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
            events += [
                {"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]} for i in range(body["max_tokens"])
            ]
            events.append(
                {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": body["max_tokens"]}}
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            for event in [*(f"data: {json.dumps(e)}\n\n" for e in events), "data: [DONE]\n\n"]:
                data = event.encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("backend", ["aiohttp", "httpx"])
async def test_openai_sse_client_counts_tokens_and_timestamps(backend: str) -> None:
    if backend == "aiohttp":
        pytest.importorskip("aiohttp")
    server, port = await _sse_server()
    client = OpenAIStreamClient(
        f"http://127.0.0.1:{port}", "m", "hello", OUTPUT_TOKENS, connections=2, timeout_s=10, backend=backend
    )
    try:
        run = await run_level(client, 2, 4, time_limit_s=30)
    finally:
        await client.aclose()
        server.close()
    summary = _check_level(run.samples, 4)
    assert all(s.messages == OUTPUT_TOKENS + 1 for s in run.samples)  # the role chunk counts as a message
    assert summary["tokens_per_message"] == pytest.approx(OUTPUT_TOKENS / (OUTPUT_TOKENS + 1))


def _level(concurrency: int, tokens_per_s: float) -> dict:
    samples = [
        RequestSample(
            sent=0.0, first=0.01 * (i + 1), last=0.05 + 0.01 * i, done=0.06 + 0.01 * i, tokens=8, messages=8
        )
        for i in range(10)
    ]
    level = {"concurrency": concurrency, "timed_out": False, **summarize(samples, 8 * 10 / tokens_per_s)}
    level["processes"] = {
        "gateway": {"cpu_cores": 0.2, "rss_mib": 70.0},
        "frontend": {"cpu_cores": 0.3, "rss_mib": 600.0},
    }
    return level


def test_report_and_plots_are_written(tmp_path: Path) -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    results = {
        "meta": {"started": "now", "command": "llmesh bench --quick", "machine": {"summary": "test"}},
        "targets": {
            "baseline": {"status": "ok", "frontend": "frontend", "levels": [_level(1, 100), _level(4, 300)]},
            "grpc": {"status": "ok", "frontend": "gateway", "levels": [_level(1, 110), _level(4, 290)]},
            "rest": {"status": "skipped: edge not available", "levels": []},
        },
        "memory": {
            "concurrency": 4,
            "requests_per_round": 10,
            "rss_before_mib": 70.0,
            "rss_mib": [70.0, 70.5],
            "growth_mib": 0.5,
            "tolerance_mib": 4.0,
            "flat": True,
        },
    }
    report.write_json(results, tmp_path / "results.json")
    assert (
        json.loads((tmp_path / "results.json").read_text())["targets"]["grpc"]["levels"][0]["concurrency"]
        == 1
    )
    text = report.markdown(results)
    assert "| llmesh full path (gRPC) | 4 |" in text and "0.97x" in text
    assert "skipped: edge not available" in text and "flat" in text
    made = plots.write_plots(results, tmp_path)
    assert {p.name for p in made} == {"throughput.png", "ttft.png"}
    assert all(p.stat().st_size > 1000 for p in made)


def test_quick_overhead_run_end_to_end(tmp_path: Path) -> None:
    """`llmesh bench --quick --targets overhead`: real processes, the scripted double, every output file."""
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmesh.cli.main",
            "bench",
            "--quick",
            "--targets",
            "overhead",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["overhead"]["status"] == "ok", results["overhead"]
    assert results["overhead"]["ceiling"]["gateway"]["completed"] > 0
    assert (out / "report.md").read_text() in done.stdout
    assert (out / "overhead_ttft.png").exists()
