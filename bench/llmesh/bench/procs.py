"""Child processes the bench starts itself, and CPU/RSS meters over any process (psutil).

`llmesh serve` children go through `llmesh.cli.stack.Stack` (`llmesh up`'s supervisor); the vLLM
baseline server and the scripted worker are started here, each in its own session so a stop reaches
their engine children.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

MiB = 1024 * 1024
# A process's RSS is flat across a soak when it grew by no more than max(8 MiB, 5 %).
FLAT_TOLERANCE_MIB = 8.0
FLAT_TOLERANCE_FRACTION = 0.05


class ChildStartError(RuntimeError):
    """A child exited or did not become ready; the message ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (for servers that cannot report a port-0 bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class ChildProcess:
    """One process with its output in a log file; `stop()` ends its whole process group."""

    def __init__(self, name: str, argv: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_file = log_file
        self.env = dict(os.environ if env is None else env)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    async def wait_ready(self, ready: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
        """Poll `ready()` until it is true; raise ChildStartError if the child dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ChildStartError(
                    f"{self.name} exited with code {self.process.returncode} before it was ready; "
                    f"log {self.log_file}:\n{log_tail(self.log_file)}"
                )
            with contextlib.suppress(Exception):
                if await ready():
                    return
            await asyncio.sleep(0.25)
        raise ChildStartError(
            f"{self.name} was not ready after {timeout_s:.0f}s; log {self.log_file}:\n{log_tail(self.log_file)}"
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL to the whole group after `timeout_s` (engine children included)."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # Children (vLLM's engine core) may outlive a parent that exited: end the group either way.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds (user + system) of a process and of its live descendants, and its RSS."""

    at: float
    cpu_s: float
    tree_cpu_s: dict[int, float]
    rss_bytes: int
    tree_rss_bytes: int


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class ProcessMeter:
    """Measures named processes: CPU used between two snapshots (in cores) and RSS.

    A process's own CPU is what a frontend costs (vLLM's API server, the llmesh worker's gRPC
    server, Envoy, the picker); `tree` adds its descendants that lived through the interval (vLLM's
    engine core under the API server or the worker).
    """

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def add(self, name: str, pid: int) -> None:
        self._procs[name] = psutil.Process(pid)

    def without(self, name: str) -> ProcessMeter:
        return ProcessMeter({n: p.pid for n, p in self._procs.items() if n != name})

    @property
    def names(self) -> list[str]:
        return list(self._procs)

    def snapshot(self) -> dict[str, CpuSnapshot]:
        out = {}
        now = time.perf_counter()
        for name, proc in self._procs.items():
            try:
                tree, tree_rss = {}, 0
                for child in proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        tree[child.pid] = _cpu_s(child)
                        tree_rss += int(child.memory_info().rss)
                rss = int(proc.memory_info().rss)
                out[name] = CpuSnapshot(now, _cpu_s(proc), tree, rss, rss + tree_rss)
            except psutil.Error:
                continue
        return out

    def rss_mib(self, name: str) -> float:
        return self._procs[name].memory_info().rss / MiB

    @staticmethod
    def delta(
        before: Mapping[str, CpuSnapshot], after: Mapping[str, CpuSnapshot]
    ) -> dict[str, dict[str, float]]:
        out = {}
        for name, end in after.items():
            start = before.get(name)
            if start is None:
                continue
            wall = max(end.at - start.at, 1e-9)
            own = end.cpu_s - start.cpu_s
            children = sum(
                cpu - start.tree_cpu_s[pid] for pid, cpu in end.tree_cpu_s.items() if pid in start.tree_cpu_s
            )
            out[name] = {
                "cpu_s": own,
                "tree_cpu_s": own + children,
                "cpu_cores": own / wall,
                "tree_cpu_cores": (own + children) / wall,
                "rss_mib": end.rss_bytes / MiB,
                "tree_rss_mib": end.tree_rss_bytes / MiB,
            }
        return out
