"""Throughput of AuthService's ext_authz Check on one core.

    python -m llmesh.bench.auth_check [--seconds 10] [--concurrency 64] [--redis redis://...]

Starts AuthService in a child process pinned to one CPU core (SQLite in a temp directory, the
in-process limiter unless --redis), creates a user and an API key, then drives Check from this
process (pinned to another core) with CheckRequests built as Envoy builds them, one scenario at a
time. Prints requests per second, latency percentiles and the server's CPU use (1.0 = the core is
saturated, so the number is the one-core throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from llmesh.auth.v1 import auth_service_pb2 as pb
from llmesh.auth.v1 import auth_service_pb2_grpc as pb_grpc
from llmesh.model.v1 import model_service_pb2 as model_pb2

CHAT = "/llmesh.model.v1.ModelService/StreamChatCompletion"
LIST = "/llmesh.model.v1.ModelService/ListModels"
ADMIN_PASSWORD = "bench-admin-password"


def _serve(args: argparse.Namespace) -> None:
    """Child: AuthService on one core until killed."""
    os.sched_setaffinity(0, {args.server_core})
    from llmesh.auth.server import AuthServiceConfig, start_auth
    from llmesh.common.config import AuthConfig
    from llmesh.common.logs import setup_logging
    from llmesh.common.server import run, serve_until_signal, write_ready_file

    setup_logging("auth", "WARNING", True)
    config = AuthServiceConfig(
        listen="127.0.0.1:0",
        database_url=args.database_url,
        redis_url=args.redis,
        auth=replace(AuthConfig(), admin_password=ADMIN_PASSWORD, default_credits=-1),
        redis_prefix=f"llmesh-bench:{{{os.getpid()}}}:",
    )

    async def main() -> None:
        running = await start_auth(config)
        write_ready_file(Path(args.ready_file), port=running.port)
        await serve_until_signal(running, 1.0)

    run(main)


def _frame(message: model_pb2.CreateChatCompletionRequest) -> bytes:
    payload = message.SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


def _check(path: str, headers: dict[str, str], body: bytes = b"") -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path=path, headers={":path": path, **headers}, raw_body=body
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


@dataclass
class Result:
    scenario: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu: float
    denied: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(
    stub: external_auth_pb2_grpc.AuthorizationStub,
    make: Callable[[], external_auth_pb2.CheckRequest],
    *,
    seconds: float,
    concurrency: int,
    server_pid: int,
    name: str,
) -> Result:
    latencies: list[float] = []
    denied = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal denied
        while time.monotonic() < stop:
            request = make()
            t0 = time.perf_counter()
            response = await stub.Check(request)
            latencies.append(time.perf_counter() - t0)
            denied += response.status.code != 0

    cpu0, t0 = _cpu_seconds(server_pid), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    cpu = (_cpu_seconds(server_pid) - cpu0) / elapsed
    latencies.sort()
    return Result(
        name,
        len(latencies),
        elapsed,
        latencies[len(latencies) // 2] * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
        cpu,
        denied,
    )


async def _bench(args: argparse.Namespace, port: int, server_pid: int) -> list[Result]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    auth = pb_grpc.AuthServiceStub(channel)
    authz = external_auth_pb2_grpc.AuthorizationStub(channel)
    admin = (await auth.Login(pb.LoginRequest(username="admin", password=ADMIN_PASSWORD))).tokens.access_token
    key = (
        await auth.CreateApiKey(
            pb.CreateApiKeyRequest(name="bench"), metadata=(("authorization", f"Bearer {admin}"),)
        )
    ).secret
    body = model_pb2.CreateChatCompletionRequest(model="tiny-llama", max_tokens=64)
    body.messages.add(role="user").content.string_value = "Say hello in one short sentence."
    frame = _frame(body)
    scenarios: list[tuple[str, Callable[[], external_auth_pb2.CheckRequest]]] = [
        ("public route (no credential)", lambda: _check("/llmesh.auth.v1.AuthService/GetJwks", {})),
        ("API key, non-inference route", lambda: _check(LIST, {"authorization": f"Bearer {key}"})),
        ("API key, chat: parse + reserve", lambda: _check(CHAT, {"authorization": f"Bearer {key}"}, frame)),
        ("JWT, chat: parse + reserve", lambda: _check(CHAT, {"authorization": f"Bearer {admin}"}, frame)),
    ]
    results = []
    for name, make in scenarios:
        await _drive(authz, make, seconds=1.0, concurrency=args.concurrency, server_pid=server_pid, name=name)
        results.append(
            await _drive(
                authz,
                make,
                seconds=args.seconds,
                concurrency=args.concurrency,
                server_pid=server_pid,
                name=name,
            )
        )
    await channel.close(None)
    return results


def _forget_reservations(url: str, pid: int) -> None:
    """Drop the bench's never-settled reservations and counters from Redis."""
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"llmesh-bench:\\{{{pid}\\}}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    parser.add_argument("--concurrency", type=int, default=64, help="Checks in flight")
    parser.add_argument("--redis", default="", help="Redis URL for the shared limiter (default: in-process)")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        child = subprocess.Popen(
            [
                sys.executable, "-m", "llmesh.bench.auth_check", "--serve",
                "--database-url", f"sqlite:///{tmp}/auth.db", "--ready-file", str(ready),
                "--redis", args.redis, "--server-core", str(args.server_core),
            ]
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                if child.poll() is not None or time.monotonic() > deadline:
                    print("auth server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            port = json.loads(ready.read_text())["port"]
            os.sched_setaffinity(0, {args.client_core})
            results = asyncio.run(_bench(args, port, child.pid))
        finally:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if args.redis:
                _forget_reservations(args.redis, child.pid)
    limiter = f"Redis limiter ({args.redis})" if args.redis else "in-process limiter"
    if args.json:
        print(json.dumps([{**r.__dict__, "rps": r.rps} for r in results]))
        return 0
    print(f"ext_authz Check on one core ({limiter}, {args.concurrency} in flight, {args.seconds:.0f} s each)")
    print(f"{'scenario':<34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'server CPU':>11} {'denied':>7}")
    for r in results:
        print(
            f"{r.scenario:<34} {r.rps:>8.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.server_cpu:>11.2f} {r.denied:>7}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
