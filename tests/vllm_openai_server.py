"""vLLM's own OpenAI-compatible server on the tiny model, as a real upstream for the `openai` engine.

One per test session (engine start takes ~30 s): the openai engine's own tests and the
engines-through-Envoy tests share it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

API_KEY = "sk-test-upstream-key"
SERVED = "tiny-llama"


@contextlib.contextmanager
def vllm_openai_server(model_dir: Path, log_dir: Path) -> Iterator[str]:
    """Start it with an API key; yields its base URL (…/v1); stops it and its engine core after."""
    port = free_port()
    log_path = log_dir / "server.log"
    # At nice 10, as llmesh runs its own engines (llmesh.worker.engine_priority): at the test's
    # priority, vLLM's busy-polling engine core starves this process's reads on a 2-core machine.
    command = [
        "nice", "-n", "10", sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", SERVED,
        "--max-model-len", "2048", "--max-num-seqs", "16",
        "--kv-cache-memory-bytes", str(1 << 30), "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        # Its own process group, so the engine-core child it spawns is stopped with it; this session,
        # so that its nice value ranks it against the test (Linux schedules sessions as units).
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, process_group=0)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready in 300s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def running_requests(base_url: str) -> float:
    """vLLM's own gauge of requests it is generating for."""
    metrics = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=5).text
    lines = [ln for ln in metrics.splitlines() if ln.startswith("vllm:num_requests_running")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)
