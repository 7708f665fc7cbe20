"""Where each process's `/metrics` side port binds, and what `llmesh up` prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llmesh.cli.stack import Child
from llmesh.cli.up import metrics_urls
from llmesh.common.config import load_config


def test_side_ports_are_ephemeral_by_default_and_offset_from_a_base_port() -> None:
    cfg = load_config(None, {})
    assert cfg.metrics_listen("registry") == "127.0.0.1:0"
    assert cfg.metrics_listen("worker", 3) == "127.0.0.1:0"
    fixed = load_config(
        None, {"LLMESH_MONITORING__METRICS_BASE_PORT": "9100", "LLMESH_MONITORING__METRICS_HOST": "0.0.0.0"}
    )
    assert [fixed.metrics_listen(s) for s in ("registry", "scheduler", "auth")] == [
        "0.0.0.0:9100",
        "0.0.0.0:9101",
        "0.0.0.0:9102",
    ]
    assert fixed.metrics_listen("worker", 0) == "0.0.0.0:9110"
    assert fixed.metrics_listen("worker", 2) == "0.0.0.0:9112"
    off = load_config(None, {"LLMESH_MONITORING__METRICS_ENABLED": "false"})
    assert off.metrics_listen("scheduler") == ""


def test_llmesh_up_lists_every_metrics_url_and_envoys_stats(tmp_path: Path) -> None:
    class Stack:
        children: list[Child] = []

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()

    def child(name: str, kind: str, info: dict[str, object]) -> Child:
        return Child(name, kind, process, tmp_path / "r", tmp_path / "l", info)

    Stack.children = [
        child(
            "registry",
            "registry",
            {"port": 1, "metrics_port": 9, "metrics_url": "http://127.0.0.1:9/metrics"},
        ),
        child("worker-0", "worker", {"port": 2, "metrics_url": "http://127.0.0.1:8/metrics"}),
        child("auth", "auth", {"port": 3}),  # metrics off
        child("envoy", "envoy", {"port": 4, "admin_port": 9901}),
    ]
    assert metrics_urls(Stack, "127.0.0.1") == [  # type: ignore[arg-type]
        ("registry", "http://127.0.0.1:9/metrics"),
        ("worker-0", "http://127.0.0.1:8/metrics"),
        ("envoy", "http://127.0.0.1:9901/stats/prometheus"),
    ]
