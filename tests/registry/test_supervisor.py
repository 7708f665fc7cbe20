"""llmesh up's WorkerSupervisor on its own, with real `llmesh serve worker` processes: ids never
collide, a worker that fails to start leaves the stack without stopping it, refusals name why."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llmesh.cli.stack import Stack
from llmesh.cli.supervisor import WorkerSupervisor
from llmesh.common.config import load_config
from llmesh.common.errors import FailedPrecondition, NotFound
from tests.registry.test_registry_instances import refused_address


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    config = tmp_path / "llmesh.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "logging": {"level": "INFO", "json": True},
                # Nothing answers there: these workers never get to join, which these tests skip.
                "endpoints": {"registry": refused_address(), "scheduler": refused_address()},
                "models": [
                    # vLLM without weights: the worker process exits at start-up.
                    {"name": "broken", "engine": "vllm"},
                    {"name": "other", "engine": "scripted"},
                ],
                "workers": [{"worker_id": "broken-1", "models": ["other"]}],
            }
        )
    )
    stack = Stack(tmp_path / "run", config)
    yield stack
    stack.stop_all(timeout_s=10)


def test_a_worker_that_fails_to_start_leaves_the_stack_running(stack: Stack) -> None:
    assert stack.config_path is not None
    supervisor = WorkerSupervisor(stack, load_config(stack.config_path))
    # broken-1 is a configured worker's id: the started ones skip it.
    first, second = supervisor.start_worker("broken", {}), supervisor.start_worker("broken", {"zone": "a"})
    assert (first, second) == ("broken-2", "broken-3")
    written = yaml.safe_load((stack.run_dir / "run" / "broken-3.config.yaml").read_text())
    assert written["workers"] == [{"worker_id": "broken-3", "models": ["broken"], "labels": {"zone": "a"}}]
    deadline = time.monotonic() + 60
    while {first, second} & {c.name for c in stack.children}:
        assert stack.exited_children() == []  # llmesh up would not stop the stack for them
        assert time.monotonic() < deadline, [c.name for c in stack.children]
        time.sleep(0.1)
    assert "has no path" in (stack.run_dir / "logs" / f"{first}.log").read_text()
    assert supervisor.start_worker("broken", {}) == "broken-4"  # ids are never reused


def test_refusals_say_why(stack: Stack) -> None:
    assert stack.config_path is not None
    supervisor = WorkerSupervisor(stack, load_config(stack.config_path))
    with pytest.raises(FailedPrecondition, match="has no engine settings for it"):
        supervisor.start_worker("catalog-only", {})
    with pytest.raises(NotFound, match="worker 'ghost' is not a process this supervisor runs"):
        supervisor.stop_worker("ghost", "", 0)
    worker_id = supervisor.start_worker("other", {})
    with pytest.raises(FailedPrecondition, match=f"worker '{worker_id}' serves model 'other', not 'broken'"):
        supervisor.stop_worker(worker_id, "broken", 0)
    assert supervisor.stop_worker(worker_id, "other", 10) == "other"
    assert supervisor.stop_worker(worker_id, "other", 10) == "other"  # stopping again: no-op
    deadline = time.monotonic() + 30
    while worker_id in {c.name for c in stack.children}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # Once it has exited too: a repeated StopWorker (a retried RPC) finds it stopped, not unknown.
    assert supervisor.stop_worker(worker_id, "other", 10) == "other"
    with pytest.raises(FailedPrecondition, match="serves model 'other', not 'broken'"):
        supervisor.stop_worker(worker_id, "broken", 0)
