"""Smoke test of the auth-latency benchmark (llmesh.bench.auth_latency): it starts its stack (real
registry, two schedulers, AuthService, two real Envoys, a ScriptedEngine-double worker), measures a
few requests per scenario on both edges and reports them. No timing is asserted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmesh.bench.auth_latency import SCENARIOS, AuthLatencySettings, format_table, run_auth_latency

pytestmark = pytest.mark.envoy


async def test_auth_latency_bench_measures_both_edges(tmp_path: Path) -> None:
    results = await run_auth_latency(AuthLatencySettings(requests=6, block=3, warmup=1), tmp_path)
    assert results["status"] == "ok", results["status"]
    for scenario in SCENARIOS:
        r = results["scenarios"][scenario]
        for edge in ("off", "on"):
            assert 0 < r[edge]["p50"] <= r[edge]["p99"]
        assert r["added_ms"]["p99"] == pytest.approx(r["on"]["p99"] - r["off"]["p99"])
        assert r["ratio"]["p50"] == pytest.approx(r["on"]["p50"] / r["off"]["p50"])
        # AuthService works only for the edge that checks credentials.
        assert r["auth_cpu_us_per_request"]["on"] > 0 and not math.isnan(r["auth_cpu_us_per_request"]["off"])
    table = format_table(results)
    assert all(f"| {s} |" in table for s in SCENARIOS)
