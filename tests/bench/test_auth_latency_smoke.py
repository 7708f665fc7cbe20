"""Smoke test of the auth-latency benchmark: `llmesh bench --quick --targets auth` starts its stack
(real registry, two schedulers, AuthService, two real Envoys, a ScriptedEngine-double worker),
measures both edges and writes the results and the report. No timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llmesh.bench.auth_latency import SCENARIOS

pytestmark = pytest.mark.envoy


def test_quick_auth_latency_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "llmesh.cli.main",
        "bench",
        "--quick",
        "--targets",
        "auth",
        "--out",
        str(out),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    auth = json.loads((out / "results.json").read_text())["auth_latency"]
    assert auth["status"] == "ok", auth["status"]
    for scenario in SCENARIOS:
        r = auth["scenarios"][scenario]
        for edge in ("off", "on"):
            assert 0 < r[edge]["p50"] <= r[edge]["p99"]
        assert r["added_ms"]["p99"] == pytest.approx(r["on"]["p99"] - r["off"]["p99"])
        assert r["ratio"]["p50"] == pytest.approx(r["on"]["p50"] / r["off"]["p50"])
        # AuthService works for the edge that checks credentials (the run also proved the other
        # edge serves without a key and this one refuses it).
        assert r["auth_cpu_us_per_request"]["on"] > 0 and not math.isnan(r["auth_cpu_us_per_request"]["off"])
    report = (out / "report.md").read_text()
    assert "## ext_authz latency (auth on vs off)" in report
    assert all(f"| {s} |" in report for s in SCENARIOS)
    assert report in done.stdout
