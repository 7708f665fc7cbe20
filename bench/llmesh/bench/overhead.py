"""The platform's own overhead, with the engine taken out: workers run the ScriptedEngine double.

The double (benchmarks and tests only, never a serving engine) emits tokens at a fixed rate, so
what differs between calling a worker directly and going through the gateway is the platform:
- added time to first token: the gateway hop plus the scheduler lease, p50 and p99, at a fixed
  per-stream token rate (the double's `tokens_per_second`);
- the lease round trip alone (Acquire then Release against the scheduler, one at a time);
- the gateway's messages/s ceiling: the double emits as fast as it can, one token per message, and
  the gateway's CPU time per relayed message gives the ceiling one gateway core can carry.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from llmesh.bench.clients import GatewayStreamClient, StreamClient, WorkerStreamClient
from llmesh.bench.engine_run import say
from llmesh.bench.loadgen import run_level, wait_until_serving, warm_up
from llmesh.bench.procs import ChildProcess, ProcessMeter
from llmesh.bench.settings import BenchSettings
from llmesh.bench.stats import percentile, summarize
from llmesh.bench.targets import ServiceStack, write_llmesh_config
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc

FIXED_MODEL = "scripted-fixed"
MAX_MODEL = "scripted-max"
PROMPT = "measure the platform overhead with the engine taken out of the picture"
MAX_MODEL_LEN = 4096
MAX_NUM_SEQS = 256


def _model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "engine": "scripted",
        "max_model_len": MAX_MODEL_LEN,
        "max_output_tokens": MAX_MODEL_LEN,
        "max_num_seqs": MAX_NUM_SEQS,
        "description": "benchmark-only test double (llmesh.bench.scripted_worker)",
    }


async def _start_scripted_worker(
    run_dir: Path, registry: str, model: str, tokens_per_second: float
) -> tuple[ChildProcess, str]:
    ready = run_dir / "run" / f"{model}.ready.json"
    ready.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "llmesh.bench.scripted_worker",
        "--registry",
        registry,
        "--model",
        model,
        "--worker-id",
        model,
        "--tokens-per-second",
        str(tokens_per_second),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--ready-file",
        str(ready),
    ]
    child = ChildProcess(model, argv, run_dir / "logs" / f"{model}.log")
    child.start()

    async def is_ready() -> bool:
        return ready.exists()

    await child.wait_ready(is_ready, 60.0)
    return child, f"127.0.0.1:{json.loads(ready.read_text())['port']}"


async def _lease_round_trips(address: str, requests: int) -> dict[str, Any]:
    """Acquire then Release, one at a time, straight against the scheduler."""
    acquire_s, release_s = [], []
    async with grpc.aio.insecure_channel(address) as channel:
        scheduler = sched_grpc.SchedulerServiceStub(channel)
        for _ in range(requests):
            began = time.perf_counter()
            reply = await scheduler.Acquire(
                sched_pb.AcquireRequest(request_id=uuid.uuid4().hex, model=FIXED_MODEL, max_tokens=32),
                timeout=10,
            )
            acquired = time.perf_counter()
            await scheduler.Release(
                sched_pb.ReleaseRequest(lease_id=reply.lease.lease_id, outcome=sched_pb.OUTCOME_SUCCESS),
                timeout=10,
            )
            acquire_s.append(acquired - began)
            release_s.append(time.perf_counter() - acquired)
    return {
        "requests": requests,
        "acquire_ms": {f"p{q}": percentile(acquire_s, q) * 1000 for q in (50, 99)},
        "release_ms": {f"p{q}": percentile(release_s, q) * 1000 for q in (50, 99)},
    }


async def _level(
    client: StreamClient, meter: ProcessMeter, concurrency: int, requests: int, limit_s: float
) -> dict[str, Any]:
    before = meter.snapshot()
    run = await run_level(client, concurrency, requests, time_limit_s=limit_s)
    after = meter.snapshot()
    summary = summarize(run.samples, run.wall_s)
    summary["processes"] = ProcessMeter.delta(before, after)
    summary["concurrency"] = concurrency
    return summary


def _per_message_us(level: dict[str, Any], process: str) -> float:
    messages = level["messages"]
    cpu = level["processes"].get(process, {}).get("cpu_s", float("nan"))
    return cpu / messages * 1e6 if messages else float("nan")


async def run_overhead(settings: BenchSettings, run_dir: Path) -> dict[str, Any]:
    ov = settings.overhead
    config = write_llmesh_config(
        run_dir / "llmesh.yaml",
        [_model_entry(FIXED_MODEL), _model_entry(MAX_MODEL)],
        [
            {"worker_id": FIXED_MODEL, "models": [FIXED_MODEL]},
            {"worker_id": MAX_MODEL, "models": [MAX_MODEL]},
        ],
    )
    stack = ServiceStack(run_dir, config)
    workers: list[ChildProcess] = []
    clients: list[StreamClient] = []
    try:
        say("overhead: starting registry, scheduler, two scripted-double workers, gateway")
        await asyncio.to_thread(stack.start, ("registry", "scheduler"))
        registry = stack.addresses["registry"]
        fixed, fixed_address = await _start_scripted_worker(
            run_dir, registry, FIXED_MODEL, ov.tokens_per_second
        )
        workers.append(fixed)
        fastest, max_address = await _start_scripted_worker(run_dir, registry, MAX_MODEL, 0.0)
        workers.append(fastest)
        await asyncio.to_thread(stack.start_gateway)
        meter = ProcessMeter(
            {
                "gateway": stack.pids["gateway"],
                "scheduler": stack.pids["scheduler"],
                "worker": fixed.pid,
                "worker_max": fastest.pid,
                "client": os.getpid(),
            }
        )
        gateway = stack.addresses["gateway"]
        timeout = settings.load.request_timeout_s

        # --- added latency at a fixed token rate
        streams = max(ov.concurrency)
        direct = WorkerStreamClient(
            fixed_address, FIXED_MODEL, PROMPT, ov.output_tokens, timeout_s=timeout, streams=streams
        )
        via = GatewayStreamClient(
            gateway, FIXED_MODEL, PROMPT, ov.output_tokens, timeout_s=timeout, streams=streams
        )
        clients += [direct, via]
        for client in (direct, via):
            failure = await wait_until_serving(client, timeout_s=60.0)
            if failure is not None:
                raise RuntimeError(f"{client.name} never served a request: {failure}")
            await warm_up(client, 32, concurrency=4)
        latency = []
        for concurrency in ov.concurrency:
            worker_level = await _level(
                direct, meter, concurrency, ov.requests, settings.load.level_timeout_s
            )
            gateway_level = await _level(via, meter, concurrency, ov.requests, settings.load.level_timeout_s)
            added = {
                q: gateway_level["ttft_ms"][q] - worker_level["ttft_ms"][q] for q in ("p50", "p90", "p99")
            }
            latency.append(
                {
                    "concurrency": concurrency,
                    "worker": worker_level,
                    "gateway": gateway_level,
                    "added_ttft_ms": added,
                }
            )
            say(
                f"overhead c={concurrency:<3} TTFT worker p50 {worker_level['ttft_ms']['p50']:.2f} ms "
                f"gateway p50 {gateway_level['ttft_ms']['p50']:.2f} ms -> added p50 {added['p50']:.2f} ms "
                f"p99 {added['p99']:.2f} ms"
            )
        lease = await _lease_round_trips(stack.addresses["scheduler"], ov.lease_requests)
        say(
            f"overhead: lease Acquire p50 {lease['acquire_ms']['p50']:.2f} ms, p99 {lease['acquire_ms']['p99']:.2f} ms"
        )

        # --- messages/s ceiling: the double as fast as it goes, one token per message
        direct_max = WorkerStreamClient(
            max_address,
            MAX_MODEL,
            PROMPT,
            ov.ceiling_output_tokens,
            timeout_s=timeout,
            streams=ov.ceiling_concurrency,
        )
        via_max = GatewayStreamClient(
            gateway,
            MAX_MODEL,
            PROMPT,
            ov.ceiling_output_tokens,
            timeout_s=timeout,
            streams=ov.ceiling_concurrency,
        )
        clients += [direct_max, via_max]
        ceiling: dict[str, Any] = {
            "concurrency": ov.ceiling_concurrency,
            "output_tokens": ov.ceiling_output_tokens,
        }
        for name, client, process in (("worker", direct_max, "worker_max"), ("gateway", via_max, "gateway")):
            await warm_up(client, 8, concurrency=4)
            level = await _level(
                client, meter, ov.ceiling_concurrency, ov.ceiling_requests, ov.ceiling_timeout_s
            )
            level["cpu_us_per_message"] = _per_message_us(level, process)
            level["worker_cpu_us_per_message"] = _per_message_us(level, "worker_max")
            ceiling[name] = level
            say(
                f"overhead ceiling via {name}: {level['messages_per_s']:.0f} messages/s, "
                f"{process} {level['cpu_us_per_message']:.0f} µs CPU per message"
            )
        gw_us = ceiling["gateway"]["cpu_us_per_message"]
        ceiling["gateway_one_core_messages_per_s"] = (
            1e6 / gw_us if math.isfinite(gw_us) and gw_us > 0 else math.nan
        )
        return {
            "status": "ok",
            "tokens_per_second_per_stream": ov.tokens_per_second,
            "output_tokens": ov.output_tokens,
            "requests": ov.requests,
            "latency": latency,
            "lease": lease,
            "ceiling": ceiling,
            "gateway_rss_mib": meter.rss_mib("gateway"),
        }
    except Exception as error:
        say(f"overhead failed: {type(error).__name__}: {error}")
        return {"status": f"failed: {type(error).__name__}: {str(error)[:1000]}"}
    finally:
        for opened in clients:
            await opened.aclose()
        say("overhead: stopping")
        # Gateway first, then the workers (they deregister), then registry and scheduler.
        await asyncio.to_thread(stack.stop_one, "gateway")
        for worker in workers:
            await asyncio.to_thread(worker.stop, 10.0)
        await asyncio.to_thread(stack.stop)
