"""The latency AuthService's ext_authz check adds to each request at the edge: auth on against auth off,
measured in one run on one stack.

    python -m llmesh.bench.auth_latency [--requests 500] [--block 50] [--json] [--out results.json]

One registry and one worker (the ScriptedEngine **test double**, `llmesh.bench.scripted_worker`: it
answers at once, so the engine is out of the picture) behind two edges that differ only in auth:

- off: an Envoy without the ext_authz filter, its own scheduler without a usage sink (what `llmesh
  up` runs with `auth.enabled: false`);
- on: an Envoy with ext_authz answered by AuthService, a scheduler reporting usage to AuthService's
  ledger (`auth.enabled: true`).

Services run as `llmesh serve` processes, Envoy as the edge config renders it. Scenarios, each one
request at a time with an API key (the off edge ignores it):
- `GET /v1/models` (REST): ext_authz authenticates the key (a non-inference route);
- a 1-token unary chat completion (native gRPC): authenticate, parse the body, reserve the worst
  case, then (off the request path) record usage and settle.
The two edges alternate in blocks so drift on a shared machine hits both alike. Reported: p50/p90/p99
per edge, the difference (on - off) and the ratio (on / off), and AuthService's CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import struct_pb2

from llmesh.auth.v1 import auth_service_pb2 as auth_pb
from llmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from llmesh.bench.overhead import MODEL, _model_entry, _start_scripted_worker
from llmesh.bench.procs import ChildProcess, ProcessMeter
from llmesh.bench.run import say
from llmesh.bench.stats import percentile
from llmesh.bench.targets import write_llmesh_config
from llmesh.model.v1 import model_service_pb2 as model_pb
from llmesh.model.v1 import model_service_pb2_grpc as model_grpc

ADMIN_PASSWORD = "bench-admin-password"
EDGES = ("off", "on")
SCENARIOS = ("GET /v1/models (REST)", "1-token chat (gRPC unary)")
QUANTILES = (50.0, 90.0, 99.0)


@dataclasses.dataclass(frozen=True)
class AuthLatencySettings:
    """Requests per scenario and edge, how many go in one block before the edges swap, warm-up."""

    requests: int = 500
    block: int = 50
    warmup: int = 20

    def __post_init__(self) -> None:
        if self.requests < 1 or self.block < 1 or self.warmup < 0:
            raise ValueError("requests and block must be >= 1, warmup >= 0")


@dataclasses.dataclass
class Edge:
    """One Envoy in front of the stack, and a client of each kind for it."""

    name: str
    envoy: Any  # llmesh.edge.EnvoyProcess
    http: httpx.AsyncClient
    channel: grpc.aio.Channel
    models: model_grpc.ModelServiceStub


def _start_services(run_dir: Path, config: Path) -> tuple[Any, dict[str, str]]:
    """Registry, a plain scheduler, then (auth enabled for the children started from there on)
    AuthService and a scheduler that reports usage to it."""
    from llmesh.cli.stack import Stack

    stack = Stack(run_dir, config)
    addresses: dict[str, str] = {}
    for kind, name in (("registry", "registry"), ("scheduler", "scheduler-off")):
        child = stack.start(kind, name=name, listen="127.0.0.1:0")
        addresses[name] = f"127.0.0.1:{child.port}"
        if kind == "registry":
            stack.set_endpoint("registry", addresses[name])
    stack.env.update(
        {
            "LLMESH_AUTH__ENABLED": "true",
            "LLMESH_AUTH__ADMIN_PASSWORD": ADMIN_PASSWORD,
            "LLMESH_AUTH__DEFAULT_CREDITS": "-1",
        }
    )
    auth = stack.start("auth", listen="127.0.0.1:0")
    addresses["auth"] = f"127.0.0.1:{auth.port}"
    stack.set_endpoint("auth", addresses["auth"])
    scheduler = stack.start("scheduler", name="scheduler-on", listen="127.0.0.1:0")
    addresses["scheduler-on"] = f"127.0.0.1:{scheduler.port}"
    return stack, addresses


async def _start_edge(name: str, addresses: dict[str, str], run_dir: Path) -> Edge:
    from llmesh.edge import EnvoyProcess
    from llmesh.edge.descriptor import default_descriptor_path
    from llmesh.edge.settings import EdgeSettings

    settings = EdgeSettings(
        listen_port=0,
        admin_port=0,
        registry=addresses["registry"],
        auth=addresses["auth"],
        scheduler=addresses[f"scheduler-{name}"],
        descriptor_path=str(default_descriptor_path()),
        access_log_path="",
        auth_enabled=name == "on",
    )
    envoy = EnvoyProcess(settings, run_dir / f"envoy-{name}")
    await envoy.start()
    channel = grpc.aio.insecure_channel(envoy.grpc_target)
    return Edge(
        name,
        envoy,
        httpx.AsyncClient(base_url=envoy.url, timeout=30),
        channel,
        model_grpc.ModelServiceStub(channel),
    )


async def _api_key(auth_address: str) -> str:
    async with grpc.aio.insecure_channel(auth_address) as channel:
        auth = auth_grpc.AuthServiceStub(channel)
        login = await auth.Login(auth_pb.LoginRequest(username="admin", password=ADMIN_PASSWORD))
        created = await auth.CreateApiKey(
            auth_pb.CreateApiKeyRequest(name="auth-latency-bench"),
            metadata=(("authorization", f"Bearer {login.tokens.access_token}"),),
        )
    return created.secret


def _scenario_calls(edge: Edge, key: str) -> dict[str, Callable[[], Awaitable[None]]]:
    headers = {"authorization": f"Bearer {key}"}
    metadata = (("authorization", f"Bearer {key}"),)
    chat = model_pb.CreateChatCompletionRequest(
        model=MODEL,
        messages=[model_pb.ChatMessage(role="user", content=struct_pb2.Value(string_value="hi"))],
        max_tokens=1,
        ignore_eos=True,
    )

    async def models() -> None:
        response = await edge.http.get("/v1/models", headers=headers)
        if response.status_code != 200:
            raise RuntimeError(
                f"GET /v1/models via auth {edge.name}: {response.status_code} {response.text[:300]}"
            )

    async def one_token() -> None:
        answer = await edge.models.CreateChatCompletion(chat, metadata=metadata, timeout=30)
        if answer.usage.completion_tokens != 1:
            raise RuntimeError(f"1-token chat via auth {edge.name} returned {answer.usage}")

    return dict(zip(SCENARIOS, (models, one_token), strict=True))


async def _until_serving(call: Callable[[], Awaitable[None]], timeout_s: float = 60.0) -> None:
    """Until a request succeeds: EDS and health checks take a moment to see the worker."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await call()
            return
        except (grpc.aio.AioRpcError, RuntimeError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _check_only_one_edge_checks_credentials(edges: list[Edge]) -> None:
    """Without a key the off edge serves and the on edge refuses: else the two edges would not differ
    by auth and the comparison would mean nothing."""
    for edge in edges:
        status = (await edge.http.get("/v1/models")).status_code
        if status != {"off": 200, "on": 401}[edge.name]:
            raise RuntimeError(f"GET /v1/models without a key via auth {edge.name} answered {status}")


def _distribution(latencies_s: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies_s]
    out = {f"p{q:.0f}": percentile(ms, q) for q in QUANTILES}
    out["mean"] = sum(ms) / len(ms)
    return out


def compare(off: dict[str, float], on: dict[str, float]) -> dict[str, dict[str, float]]:
    """What auth adds: on - off (ms) and on / off, per quantile."""
    keys = [k for k in off if k in on]
    return {
        "added_ms": {k: on[k] - off[k] for k in keys},
        "ratio": {k: on[k] / off[k] if off[k] else float("nan") for k in keys},
    }


async def _measure(
    calls: dict[str, dict[str, Callable[[], Awaitable[None]]]],
    settings: AuthLatencySettings,
    meter: ProcessMeter,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for scenario in SCENARIOS:
        latencies: dict[str, list[float]] = {e: [] for e in EDGES}
        auth_cpu_s = dict.fromkeys(EDGES, 0.0)
        for edge in EDGES:
            for _ in range(settings.warmup):
                await calls[edge][scenario]()
        done = 0
        while done < settings.requests:
            block = min(settings.block, settings.requests - done)
            for edge in EDGES:
                call = calls[edge][scenario]
                before = meter.snapshot()
                for _ in range(block):
                    t0 = time.perf_counter()
                    await call()
                    latencies[edge].append(time.perf_counter() - t0)
                after = meter.snapshot()
                auth_cpu_s[edge] += ProcessMeter.delta(before, after).get("auth", {}).get("cpu_s", 0.0)
            done += block
        dist = {e: _distribution(latencies[e]) for e in EDGES}
        results[scenario] = {
            **dist,
            **compare(dist["off"], dist["on"]),
            "auth_cpu_us_per_request": {e: auth_cpu_s[e] / settings.requests * 1e6 for e in EDGES},
        }
        added = results[scenario]["added_ms"]
        say(
            f"auth latency, {scenario}: off p50 {dist['off']['p50']:.2f} p99 {dist['off']['p99']:.2f} ms; "
            f"on p50 {dist['on']['p50']:.2f} p99 {dist['on']['p99']:.2f} ms; "
            f"added p50 {added['p50']:+.2f} ms p99 {added['p99']:+.2f} ms"
        )
    return results


async def run_auth_latency(settings: AuthLatencySettings, run_dir: Path) -> dict[str, Any]:
    """Start the stack, measure every scenario on both edges, stop; {"status": "failed: ..."} on error."""
    config = write_llmesh_config(
        run_dir / "llmesh.yaml", [_model_entry(MODEL)], [{"worker_id": MODEL, "models": [MODEL]}]
    )
    stack: Any = None
    worker: ChildProcess | None = None
    edges: list[Edge] = []
    try:
        say("auth latency: starting registry, two schedulers, auth, a scripted-double worker, two Envoys")
        stack, addresses = await asyncio.to_thread(_start_services, run_dir, config)
        worker, _ = await _start_scripted_worker(run_dir, addresses["registry"], MODEL, 0.0)
        for name in EDGES:
            edges.append(await _start_edge(name, addresses, run_dir))
        key = await _api_key(addresses["auth"])
        calls = {edge.name: _scenario_calls(edge, key) for edge in edges}
        for per_edge in calls.values():
            for call in per_edge.values():
                await _until_serving(call)
        await _check_only_one_edge_checks_credentials(edges)
        auth_pid = next(c.process.pid for c in stack.children if c.kind == "auth")
        measured = await _measure(calls, settings, ProcessMeter({"auth": auth_pid}))
        return {"status": "ok", "settings": dataclasses.asdict(settings), "scenarios": measured}
    except Exception as error:
        say(f"auth latency failed: {type(error).__name__}: {error}")
        return {"status": f"failed: {type(error).__name__}: {str(error)[:1500]}"}
    finally:
        for edge in edges:
            await edge.http.aclose()
            await edge.channel.close(None)
            await edge.envoy.stop()
        if worker is not None:
            await asyncio.to_thread(worker.stop, 10.0)
        if stack is not None:
            await asyncio.to_thread(stack.stop_all)


def format_table(results: dict[str, Any]) -> str:
    """The scenarios as a Markdown table: both edges, the difference and the ratio."""
    lines = [
        "| scenario | auth off p50 / p99 ms | auth on p50 / p99 ms | added p50 / p99 ms | on/off p50 / p99 "
        "| auth CPU µs/request |",
        "|---|---|---|---|---|---|",
    ]
    for scenario, r in results.get("scenarios", {}).items():
        lines.append(
            f"| {scenario} | {r['off']['p50']:.2f} / {r['off']['p99']:.2f} | {r['on']['p50']:.2f} / "
            f"{r['on']['p99']:.2f} | {r['added_ms']['p50']:+.2f} / {r['added_ms']['p99']:+.2f} | "
            f"{r['ratio']['p50']:.2f}x / {r['ratio']['p99']:.2f}x | {r['auth_cpu_us_per_request']['on']:.0f} |"
        )
    return "\n".join(lines)


def auth_latency_section(results: dict[str, Any]) -> list[str]:
    """The report's lines: what was measured, and the table (or why there is none)."""
    if results.get("status") != "ok":
        return [f"Auth latency: {results.get('status')}"]
    s = results["settings"]
    return [
        f"One request at a time, {s['requests']} per scenario and edge, the edges alternating in blocks of "
        f"{s['block']}; one stack (registry, a ScriptedEngine-double worker) behind an Envoy without ext_authz "
        "and one with it (AuthService, usage recorded to its ledger). Added = on - off; on/off = the ratio; "
        "auth CPU = AuthService's CPU per request on the auth edge (Check, and for chat RecordUsage).",
        "",
        format_table(results),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="per scenario and edge")
    parser.add_argument("--block", type=int, default=50, help="requests before the edges swap")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per scenario and edge")
    parser.add_argument("--run-dir", type=Path, help="logs and configs (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    try:
        settings = AuthLatencySettings(args.requests, args.block, args.warmup)
    except ValueError as error:
        parser.error(str(error))
    with contextlib.ExitStack() as cleanup:
        run_dir = args.run_dir or Path(cleanup.enter_context(tempfile.TemporaryDirectory()))
        results = asyncio.run(run_auth_latency(settings, run_dir))
    results["machine"] = {"cpus": os.cpu_count()}
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results))
    elif results["status"] == "ok":
        print(format_table(results))
    else:
        print(results["status"], file=sys.stderr)
    return 0 if results["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
