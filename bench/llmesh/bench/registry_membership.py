"""Heartbeat and watch overhead of the registry with many workers.

    python -m llmesh.bench.registry_membership [--workers 100] [--seconds 30] [--watchers 10]
        [--interval 2] [--database-url URL]

Starts `llmesh serve registry` (SQLite in a temp directory unless --database-url) and `llmesh serve
scheduler` watching it, as child processes. This process then runs N simulated workers (the real
`WorkerMembership` client, heartbeating every --interval seconds) and W extra WatchWorkers streams.
Every heartbeat carries a new load, so each one is an UPDATED event fanned out to the scheduler and
to every watcher: the worst case for the watch. Measured over --seconds after a warm-up:
- CPU of the registry and of the scheduler (seconds of CPU per second: 0.01 = 1 % of one core),
- heartbeats per second and heartbeat RPC latency,
- fan-out latency: from the moment a worker's load is read for its heartbeat to the moment each
  watcher receives the UPDATED event carrying it (p50/p90/p99/max).
A second phase repeats with a constant load (heartbeats renew TTLs but publish nothing).
Prints one JSON object per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.v1 import common_pb2
from llmesh.registry.membership import WorkerMembership
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Child:
    """A `llmesh serve ...` child process."""

    name: str
    proc: subprocess.Popen[bytes]
    address: str

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_child(name: str, workdir: Path, config: Path, args: list[str], env: dict[str, str]) -> Child:
    port = free_port()
    log = (workdir / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmesh.cli.main",
            "--config",
            str(config),
            "serve",
            name,
            "--listen",
            f"127.0.0.1:{port}",
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    return Child(name, proc, f"127.0.0.1:{port}")


async def wait_serving(address: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING within {timeout}s")
            await asyncio.sleep(0.1)


@dataclass
class Probe:
    """Send times of each (worker, sequence) load, and what the watchers saw."""

    changing: bool = True
    sent: dict[tuple[str, int], float] = field(default_factory=dict)
    fanout_ms: list[float] = field(default_factory=list)
    heartbeats: int = 0
    measuring: bool = False

    def load_fn(self, worker_id: str) -> Any:
        seq = 0

        def load() -> common_pb2.WorkerLoad:
            nonlocal seq
            if self.changing:
                seq += 1
                self.sent[(worker_id, seq)] = time.perf_counter()
            if self.measuring:
                self.heartbeats += 1
            return common_pb2.WorkerLoad(running_requests=seq, waiting_requests=1)

        return load

    async def watch(self, stub: registry_grpc.RegistryServiceStub) -> None:
        async for event in stub.WatchWorkers(registry_pb2.WatchWorkersRequest()):
            if event.type != registry_pb2.WORKER_EVENT_TYPE_UPDATED:
                continue
            sent = self.sent.get((event.worker.worker_id, event.worker.load.running_requests))
            if sent is not None and self.measuring:
                self.fanout_ms.append((time.perf_counter() - sent) * 1000)


async def measure(
    probe: Probe, registry: Child, scheduler: Child, seconds: float, phase: str, workers: int, watchers: int
) -> dict[str, Any]:
    probe.fanout_ms.clear()
    probe.heartbeats = 0
    cpu0 = (registry.cpu_seconds(), scheduler.cpu_seconds(), psutil.Process().cpu_times())
    probe.measuring = True
    began = time.perf_counter()
    await asyncio.sleep(seconds)
    probe.measuring = False
    elapsed = time.perf_counter() - began
    own = psutil.Process().cpu_times()
    return {
        "phase": phase,
        "workers": workers,
        "watchers": watchers + 1,  # plus the scheduler's own watch
        "seconds": round(elapsed, 1),
        "heartbeats_per_s": round(probe.heartbeats / elapsed, 1),
        "registry_cpu_core_fraction": round((registry.cpu_seconds() - cpu0[0]) / elapsed, 4),
        "scheduler_cpu_core_fraction": round((scheduler.cpu_seconds() - cpu0[1]) / elapsed, 4),
        "bench_cpu_core_fraction": round(
            (own.user + own.system - cpu0[2].user - cpu0[2].system) / elapsed, 4
        ),
        "fanout_events": len(probe.fanout_ms),
        "fanout_ms_p50": round(percentile(probe.fanout_ms, 0.5), 2),
        "fanout_ms_p90": round(percentile(probe.fanout_ms, 0.9), 2),
        "fanout_ms_p99": round(percentile(probe.fanout_ms, 0.99), 2),
        "fanout_ms_max": round(max(probe.fanout_ms, default=float("nan")), 2),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="llmesh-bench-registry-"))
    config = workdir / "llmesh.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "logging": {"level": "WARNING", "json": True},
                "registry": {
                    "heartbeat_interval_seconds": args.interval,
                    "heartbeat_ttl_seconds": max(args.interval * 5, 10),
                },
                "models": [{"name": "bench-model"}],
            }
        )
    )
    database_url = args.database_url or f"sqlite:///{workdir}/llmesh.db"
    registry = start_child(
        "registry", workdir, config, ["--data-dir", str(workdir)], {"LLMESH_DATABASE__URL": database_url}
    )
    scheduler: Child | None = None
    members: list[WorkerMembership] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        await wait_serving(registry.address)
        scheduler = start_child(
            "scheduler", workdir, config, [], {"LLMESH_ENDPOINTS__REGISTRY": registry.address}
        )
        await wait_serving(scheduler.address)
        probe = Probe()
        channel = grpc.aio.insecure_channel(registry.address)
        stub = registry_grpc.RegistryServiceStub(channel)
        tasks = [asyncio.create_task(probe.watch(stub)) for _ in range(args.watchers)]
        for i in range(args.workers):
            worker = registry_pb2.Worker(
                worker_id=f"bench-{i:03d}",
                address=f"10.0.{i // 250}.{i % 250}:50060",
                models=["bench-model"],
                capacity=64,
                labels={"zone": f"z{i % 3}", "gpu": "h100"},
            )
            m = WorkerMembership(channel, worker, probe.load_fn(worker.worker_id), float(args.interval))
            members.append(m)
        await asyncio.gather(*(m.start() for m in members))
        await asyncio.sleep(args.interval * 2)  # warm-up: every worker heartbeats a few times
        results = [
            await measure(
                probe,
                registry,
                scheduler,
                args.seconds,
                "load changes every heartbeat",
                args.workers,
                args.watchers,
            )
        ]
        probe.changing = False
        await asyncio.sleep(args.interval * 2)
        results.append(
            await measure(
                probe, registry, scheduler, args.seconds, "constant load", args.workers, args.watchers
            )
        )
        return results
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*(m.stop() for m in members), return_exceptions=True)
        if scheduler is not None:
            scheduler.stop()
        registry.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--watchers", type=int, default=10, help="WatchWorkers streams besides the scheduler's"
    )
    parser.add_argument("--interval", type=int, default=2, help="heartbeat interval in seconds")
    parser.add_argument(
        "--database-url", default="", help="registry database (default: SQLite in a temp dir)"
    )
    args = parser.parse_args(argv)
    for result in asyncio.run(run(args)):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
