"""Cluster join and `llmesh workers`: a `llmesh serve worker --registry HOST:PORT` process joins a
registry it was told about only on its command line, and `llmesh workers` (a real CLI process) lists
the members with their load, as a table and as JSON."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmesh.common.config import ModelConfig
from llmesh.common.v1 import common_pb2
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from tests.registry.test_registry_instances import refused_address

MODEL = ModelConfig(name="scripted-model", engine="scripted", aliases=("sm",), max_model_len=512)


def llmesh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmesh.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_a_worker_joins_by_flag_and_llmesh_workers_lists_members(
    make_registry: Any, tmp_path: Path, worker_process: list[subprocess.Popen[bytes]]
) -> None:
    running, stub = await make_registry(models=(MODEL,), ttl=5.0, interval=1.0)
    registry = f"127.0.0.1:{running.port}"
    # One member registered over the API, with load.
    await stub.RegisterWorker(
        registry_pb2.RegisterWorkerRequest(
            worker=registry_pb2.Worker(
                worker_id="gpu-a",
                address="10.0.0.5:50060",
                models=["sm"],
                engine="vllm",
                capacity=8,
                labels={"gpu": "h100", "zone": "a"},
            )
        )
    )
    load = common_pb2.WorkerLoad(running_requests=2, waiting_requests=1, kv_cache_usage=0.5)

    async def heartbeats() -> None:  # what that member's own loop would send, once a second
        while True:
            await stub.Heartbeat(registry_pb2.HeartbeatRequest(worker_id="gpu-a", load=load))
            await asyncio.sleep(1)

    beating = asyncio.create_task(heartbeats())
    try:
        # One joining from "another machine": its config names no registry; the flag does.
        config = tmp_path / "worker.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "logging": {"level": "INFO", "json": True},
                    "models": [{"name": MODEL.name, "engine": "scripted", "max_model_len": 512}],
                    "workers": [{"worker_id": "remote-0", "labels": {"zone": "b"}}],
                }
            )
        )
        ready = tmp_path / "remote-0.ready.json"
        log = (tmp_path / "remote-0.log").open("wb")
        argv = [sys.executable, "-m", "llmesh.cli.main", "--config", str(config), "serve", "worker"]
        argv += ["--registry", registry, "--listen", "127.0.0.1:0", "--ready-file", str(ready)]
        argv += ["--data-dir", str(tmp_path)]
        worker_process.append(
            await asyncio.to_thread(subprocess.Popen, argv, stdout=log, stderr=subprocess.STDOUT)
        )
        deadline = time.monotonic() + 90
        while True:
            listed = await stub.ListWorkers(registry_pb2.ListWorkersRequest())
            if "remote-0" in [w.worker_id for w in listed.workers]:
                break
            assert worker_process[0].poll() is None, (tmp_path / "remote-0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker never joined"
            await asyncio.sleep(0.1)
        port = json.loads(ready.read_text())["port"]

        result = await asyncio.to_thread(llmesh, "workers", "--registry", registry, "--json")
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)
        assert shown["registry"] == registry
        rows = {r["worker_id"]: r for r in shown["workers"]}
        assert set(rows) == {"gpu-a", "remote-0"}
        gpu = rows["gpu-a"]
        assert gpu["address"] == "10.0.0.5:50060" and gpu["models"] == [MODEL.name]
        assert (gpu["status"], gpu["running_requests"], gpu["waiting_requests"]) == ("READY", 2, 1)
        assert (gpu["capacity"], gpu["kv_cache_usage"]) == (8, 0.5)
        assert gpu["labels"] == {"gpu": "h100", "zone": "a"}
        assert 0 <= gpu["heartbeat_age_s"] < 30
        remote = rows["remote-0"]
        assert remote["address"] == f"127.0.0.1:{port}" and remote["engine"] == "scripted"
        assert remote["labels"] == {"zone": "b"} and remote["status"] == "READY"

        table = await asyncio.to_thread(llmesh, "workers", "--registry", registry, "--model", "sm")
        assert table.returncode == 0, table.stderr
        header, *lines = table.stdout.splitlines()
        assert header.split() == [
            "ID",
            "ADDRESS",
            "MODELS",
            "STATUS",
            "RUNNING",
            "WAITING",
            "CAPACITY",
            "KV",
            "LABELS",
            "HEARTBEAT",
        ]
        assert lines[0].split()[:9] == [
            "gpu-a",
            "10.0.0.5:50060",
            MODEL.name,
            "READY",
            "2",
            "1",
            "8",
            "50%",
            "gpu=h100,zone=a",
        ]
        assert lines[1].split()[0] == "remote-0" and "zone=b" in lines[1]

        none = await asyncio.to_thread(llmesh, "workers", "--registry", registry, "--model", "other")
        assert none.returncode == 0 and "no live workers registered" in none.stdout
    finally:
        beating.cancel()
    # The joined worker leaves on SIGTERM.
    worker_process[0].terminate()
    assert await asyncio.to_thread(worker_process[0].wait, 40) == 0
    listed = await stub.ListWorkers(registry_pb2.ListWorkersRequest())
    assert "remote-0" not in [w.worker_id for w in listed.workers]  # it deregistered


def test_llmesh_workers_says_when_the_registry_is_unreachable() -> None:
    address = refused_address()
    result = llmesh("workers", "--registry", address, "--timeout", "3")
    assert result.returncode == 1
    assert f"llmesh workers: registry at {address}: UNAVAILABLE" in result.stderr
