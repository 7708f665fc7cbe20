"""Run the whole platform on one machine as child processes (`llmesh up`, and the tests).

Children start in dependency order — registry, scheduler, auth, workers, Envoy — each
with `--ready-file`, so the supervisor learns the port it bound (port 0 works) and hands it to
the next children as an endpoint override. Stopping drains the workers first (they leave the pool
and finish their streams through Envoy), then stops Envoy and the rest in reverse order.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# How long a child may take to report ready. Workers load the engine (~30 s for vLLM on CPU).
READY_TIMEOUT_S = {"worker": 300.0}
DEFAULT_READY_TIMEOUT_S = 60.0
# A stopping child drains first (a worker lets its streams finish: server.shutdown_grace_seconds,
# 30 s by default), so give it that and some before SIGKILL.
STOP_TIMEOUT_S = 45.0
# A SIGKILLed process is gone within milliseconds. One that is not (stuck in the kernel) is reported
# and left behind, so that stopping the rest of the stack does not hang on it.
KILL_WAIT_S = 30.0


class StackError(RuntimeError):
    """A child failed to start; the message carries the tail of its log."""


@dataclass
class Child:
    """One service process and where it reports readiness and logs."""

    name: str
    kind: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    info: dict[str, object] = field(default_factory=dict)
    # Started at runtime (StartModelInstance): its exit is the supervisor's business, not a reason
    # to stop the stack.
    on_demand: bool = False
    # Being stopped on purpose: its exit is expected.
    stopping: bool = False

    @property
    def port(self) -> int:
        return int(self.info["port"])  # type: ignore[call-overload]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class Stack:
    """Supervises llmesh service processes under one run directory."""

    def __init__(self, run_dir: Path, config_path: Path | None, env: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.config_path = config_path
        self.env = dict(os.environ if env is None else env)
        self.children: list[Child] = []
        # Guards `children`: the supervisor's RPC threads start and stop workers while `llmesh up`
        # watches them.
        self.lock = threading.RLock()
        # Called first by stop_all (the supervisor stops taking requests to start workers).
        self.on_stop: list[Callable[[], None]] = []
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "run").mkdir(parents=True, exist_ok=True)

    def set_endpoint(self, service: str, address: str) -> None:
        """Tell children started from now on where `service` listens."""
        self.env[f"LLMESH_ENDPOINTS__{service.upper()}"] = address

    def start(self, kind: str, *, name: str | None = None, listen: str, extra: tuple[str, ...] = ()) -> Child:
        """Start `llmesh serve <kind>` and wait until it reports ready."""
        child = self.spawn(kind, name=name, listen=listen, extra=extra)
        self.wait_ready(child)
        return child

    def wait_ready(self, child: Child) -> None:
        """Wait until a spawned child reports ready (StackError with its log's tail if it does not)."""
        self._wait_ready(child, READY_TIMEOUT_S.get(child.kind, DEFAULT_READY_TIMEOUT_S))

    def spawn(
        self,
        kind: str,
        *,
        name: str | None = None,
        listen: str,
        extra: tuple[str, ...] = (),
        config_path: Path | None = None,
        on_demand: bool = False,
    ) -> Child:
        """Start `llmesh serve <kind>` without waiting (start several workers' engines at once);
        `config_path` overrides the stack's config file for this child."""
        name = name or kind
        ready = self.run_dir / "run" / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log_file = self.run_dir / "logs" / f"{name}.log"
        argv = [sys.executable, "-m", "llmesh.cli.main"]
        config_path = config_path or self.config_path
        if config_path is not None:
            argv += ["--config", str(config_path)]
        argv += [
            "serve",
            kind,
            "--listen",
            listen,
            "--ready-file",
            str(ready),
            "--data-dir",
            str(self.run_dir),
        ]
        argv += list(extra)
        with log_file.open("ab") as log:
            # Its own process group (killpg stops a child with its engine processes) in this session:
            # with Linux's autogroup scheduling each session competes as one unit, so children in
            # one session are what lets the engines' lower priority (worker.engine_priority) put
            # Envoy and the relays first.
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, process_group=0
            )
        child = Child(
            name=name, kind=kind, process=process, ready_file=ready, log_file=log_file, on_demand=on_demand
        )
        with self.lock:
            self.children.append(child)
        return child

    def _wait_ready(self, child: Child, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if child.ready_file.exists():
                child.info = json.loads(child.ready_file.read_text())
                return
            code = child.process.poll()
            if code is not None:
                raise StackError(
                    f"{child.name} exited with code {code} before it was ready; "
                    f"log {child.log_file}:\n{log_tail(child.log_file)}"
                )
            time.sleep(0.05)
        raise StackError(
            f"{child.name} was not ready after {timeout_s:.0f}s; log {child.log_file}:\n{log_tail(child.log_file)}"
        )

    def child(self, name: str) -> Child:
        with self.lock:
            for c in self.children:
                if c.name == name:
                    return c
        raise KeyError(name)

    def exited_children(self) -> list[Child]:
        """Children that ended on their own: neither stopped on purpose nor started on demand."""
        with self.lock:
            return [
                c for c in self.children if not (c.stopping or c.on_demand) and c.process.poll() is not None
            ]

    def forget(self, child: Child) -> None:
        """Drop an ended child from the stack (no-op when it is already gone)."""
        with self.lock:
            if child in self.children:
                self.children.remove(child)

    def stop(self, name: str, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM one child and wait for it (SIGKILL after `timeout_s`)."""
        child = self.child(name)
        child.stopping = True
        self._terminate(child, timeout_s)
        self.forget(child)
        return child.process.returncode

    def kill(self, name: str) -> None:
        """SIGKILL one child at once (crash tests)."""
        child = self.child(name)
        child.stopping = True
        self._kill(child)
        self.forget(child)

    @staticmethod
    def _kill(child: Child, wait_s: float = KILL_WAIT_S) -> None:
        """SIGKILL the child's process group (vLLM's engine processes are a worker's children) and
        the child itself (in case it left its group), then wait for it at most `wait_s`."""
        pid = child.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            child.process.kill()
        try:
            child.process.wait(wait_s)
        except subprocess.TimeoutExpired:
            print(
                f"llmesh: {child.name} (pid {pid}) has not exited {wait_s:g} s after SIGKILL; left behind",
                file=sys.stderr,
                flush=True,
            )

    @classmethod
    def _terminate(cls, child: Child, timeout_s: float) -> None:
        if child.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
        try:
            child.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            cls._kill(child)

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every child: workers first, together (each leaves the pool and lets its streams
        finish while Envoy still relays them), then Envoy, then the rest newest first."""
        for hook in self.on_stop:
            hook()
        with self.lock:
            children = list(self.children)
            for child in children:
                child.stopping = True
        workers = [c for c in children if c.kind == "worker"]
        for child in workers:
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        for child in workers:
            self._terminate(child, timeout_s)
        envoy = [c for c in children if c.kind == "envoy"]
        others = [c for c in children if c.kind not in ("worker", "envoy")]
        for child in [*envoy, *reversed(others)]:
            self._terminate(child, timeout_s)
        with self.lock:
            for child in children:
                self.forget(child)
