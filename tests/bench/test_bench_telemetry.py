"""Smoke test of the `telemetry` bench target (not of performance: no timing is asserted).

`run_telemetry` as `llmesh bench --targets telemetry` runs it — two whole llmesh stacks as processes
(`llmesh up`'s start_stack, a real Envoy), one at a time, vLLM's own serving benchmark client
through REST, a real OTLP/gRPC collector in this process — with the worker's engine swapped for the
ScriptedEngine test double (this is about the bench machinery, not inference speed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llmesh.bench.report import markdown
from llmesh.bench.settings import BenchSettings, EngineSettings, LoadSettings, OverheadSettings
from llmesh.bench.telemetry import run_telemetry
from tests.support import require

MODEL = "scripted-telemetry"
REQUESTS, OUTPUT_TOKENS = 6, 6


async def test_telemetry_target_runs_off_then_on_and_reports_the_ratio(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("llmesh.edge")
    require(
        importlib.util.find_spec("vllm.benchmarks.serve") is not None,
        "vLLM's benchmark client is not installed",
    )
    settings = BenchSettings(
        targets=("telemetry",),
        engine=EngineSettings(model_dir=tiny_model_dir, served_name=MODEL),
        load=LoadSettings(
            concurrency=(2,),
            num_prompts=(REQUESTS,),
            input_len=16,
            output_len=OUTPUT_TOKENS,
            warmups_per_stream=1,
        ),
        overhead=OverheadSettings(),
        out_dir=tmp_path / "out",
    )
    scripted = {
        "name": MODEL,
        "engine": "scripted",
        "max_model_len": 512,
        "max_output_tokens": 64,
        "max_num_seqs": 4,
    }
    result = await run_telemetry(settings, tmp_path / "run", model=scripted)

    assert result["status"] == "ok", result.get("status")
    for variant in ("off", "on"):
        (level,) = result[variant]["levels"]
        assert level["completed"] == REQUESTS and level["failed"] == 0, level.get("error_examples")
        assert level["output_tokens"] == REQUESTS * OUTPUT_TOKENS
    # Off: no side port, no span; on: every service's /metrics scraped, spans from Envoy and services.
    assert result["off"]["metrics_urls"] == 0 and result["off"]["spans_received"] == 0
    assert result["on"]["metrics_urls"] >= 4 and result["on"]["scrapes"].get("ok", 0) >= 4
    assert result["on"]["spans_received"] > 0
    assert "llmesh-edge" in result["spans_by_service"], result["spans_by_service"]
    (ratio,) = result["ratios"]
    assert ratio["concurrency"] == 2 and ratio["tok_s_on_off"] > 0 and ratio["ttft_p50_on_off"] > 0
    assert ratio["frontend_cpu_us_per_token_off"] > 0 and ratio["frontend_cpu_us_per_token_on"] > 0

    text = markdown({"meta": {}, "telemetry": result})
    assert "## Telemetry cost (metrics and tracing on vs off)" in text
    assert f"| 2 | {result['off']['levels'][0]['output_tokens_per_s']:,.0f} |" in text
