"""Token pacing probe: where, between vLLM's engine step and the client, a worker's tokens wait.

Timestamps for every token of every stream at each stage (one clock: CLOCK_MONOTONIC is shared by
all processes of the machine):

- ``step``: the engine core built the step's outputs (``EngineCoreOutputs.timestamp``, engine process);
- ``recv``: the worker's output handler took that step off the engine socket (``get_output_async``);
- ``put``: vLLM's output processor handed the request's delta to its collector (``merged`` when the
  previous delta was still unread: vLLM merges deltas for a lagging consumer);
- ``get``: the worker's generator received the chunk from the engine adapter;
- ``sent``: the servicer's ``yield`` returned (grpc-python accepted the message);
- ``client``: the client read the message (separate process, one channel per stream).

Run (the worker is a child process; the client is this process):
    python -m llmesh.bench.pacing run --model ~/.cache/llmesh-tests/tiny-llama --concurrency 16,32,64
    python -m llmesh.bench.pacing baseline --model DIR --concurrency 16,64   # vLLM's server, client side
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

PROMPT = "Write a long story about a lighthouse keeper and the sea. " * 4
BURST_WINDOW_S = 0.080


# --- worker side -------------------------------------------------------------------------------


class Trace:
    """Per-stage timestamps, recorded in the worker process and written out at shutdown."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float, list[tuple[str, int]]]] = []  # step, recv, [(req, tokens)]
        self.puts: list[tuple[str, float, bool]] = []  # request, t, merged
        self.chunks: dict[str, list[tuple[float, float, int]]] = defaultdict(list)  # req: (get, sent, n)
        self.stalls: list[tuple[float, float, float]] = []  # loop late > 20 ms: (when, late, thread cpu)
        self.gcs: list[tuple[float, float, int]] = []  # garbage collections: (start, seconds, generation)
        self._gc_start = 0.0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if phase == "start":
            self._gc_start = now
        elif now - self._gc_start > 0.005:
            self.gcs.append((self._gc_start, now - self._gc_start, info["generation"]))

    async def watch_loop(self, period_s: float = 0.005) -> None:
        while True:
            before, cpu_before = time.monotonic(), time.thread_time()
            await asyncio.sleep(period_s)
            late = time.monotonic() - before - period_s
            if late > 0.020:
                # Loop thread CPU in the stall: ~late means busy (code ran), ~0 means descheduled.
                self.stalls.append((before, late, time.thread_time() - cpu_before))

    def dump(self, path: Path) -> None:
        data = {"steps": self.steps, "puts": self.puts, "chunks": self.chunks}
        path.write_text(json.dumps({**data, "stalls": self.stalls, "gcs": self.gcs}))


def install_tracing(engine: Any, trace: Trace) -> None:
    """Hook vLLM's output path and the engine adapter's stream (after engine.start())."""
    from vllm.v1.engine.output_processor import RequestOutputCollector

    core = engine._llm.engine_core
    inner_get = core.get_output_async

    async def get_output_async() -> Any:
        outputs = await inner_get()
        now = time.monotonic()
        per = [(o.request_id, len(o.new_token_ids)) for o in outputs.outputs]
        trace.steps.append((outputs.timestamp, now, per))
        return outputs

    core.get_output_async = get_output_async
    original_put = RequestOutputCollector.put

    def put(self: Any, output: Any) -> None:
        trace.puts.append((self.request_id, time.monotonic(), self.output is not None))
        original_put(self, output)

    RequestOutputCollector.put = put  # type: ignore[method-assign,assignment]
    inner_generate = engine.generate

    async def generate(req: Any) -> AsyncIterator[Any]:
        stream = inner_generate(req)
        rows = trace.chunks[req.request_id]
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                got = time.monotonic()
                yield chunk
                rows.append((got, time.monotonic(), sum(len(c.token_ids) for c in chunk.choices)))

    engine.generate = generate


async def serve(args: argparse.Namespace) -> None:
    """The worker as `llmesh up` starts it (its own bootstrap), with the probe's hooks."""
    from llmesh.common.config import ModelConfig
    from llmesh.worker.engine_factory import build_engine
    from llmesh.worker.server import WorkerServiceConfig, start_worker

    model = ModelConfig(
        name="tiny-llama", path=args.model, max_num_seqs=args.max_num_seqs, kv_cache_space_gb=1
    )
    engine = build_engine(model)
    running = await start_worker(WorkerServiceConfig(listen="127.0.0.1:0", model=model), engine)
    trace = Trace()
    watcher: asyncio.Task[None] | None = None
    if args.trace:
        install_tracing(engine, trace)
        import gc

        gc.callbacks.append(trace.on_gc)
        watcher = asyncio.create_task(trace.watch_loop())
    write_text(Path(args.port_file), str(running.port))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await running.stop(1)
    if watcher is not None:
        watcher.cancel()
        trace.dump(Path(args.trace))


# --- client side -------------------------------------------------------------------------------


async def grpc_round(
    address: str, concurrency: int, tokens: int, channels_n: int = 0
) -> dict[str, list[tuple[float, int]]]:
    """`concurrency` streams at once over `channels_n` channels (0: one per stream, as a load
    generator; 1: all on one HTTP/2 connection, as Envoy's upstream); per request id: (receive
    time, tokens)."""
    import grpc

    from llmesh.common.v1 import common_pb2
    from llmesh.worker.v1 import worker_service_pb2 as pb
    from llmesh.worker.v1 import worker_service_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(address) for _ in range(channels_n or concurrency)]
    for channel in channels:
        await channel.channel_ready()
    received: dict[str, list[tuple[float, int]]] = {}

    async def one(channel: Any) -> None:
        rid = uuid.uuid4().hex
        request = pb.GenerateRequest(
            request_id=rid,
            model="tiny-llama",
            chat=pb.ChatInput(messages=[common_pb2.ChatTurn(role="user", content=PROMPT)]),
            sampling=common_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=1.0),
        )
        rows: list[tuple[float, int]] = []
        async for message in pb_grpc.WorkerServiceStub(channel).Generate(
            request, metadata=(("x-request-id", rid),), timeout=120
        ):
            n = sum(len(c.token_ids) for c in message.choices)
            if n:
                rows.append((time.monotonic(), n))
            rid = message.request_id or rid  # the id the worker used for the engine (for the trace)
        received[rid] = rows

    await asyncio.gather(*(one(channels[i % len(channels)]) for i in range(concurrency)))
    for channel in channels:
        await channel.close(None)
    return received


async def sse_round(base_url: str, concurrency: int, tokens: int) -> dict[str, list[tuple[float, int]]]:
    """The same load on vLLM's OpenAI server (chat completions, SSE), one connection per stream."""
    import aiohttp

    received: dict[str, list[tuple[float, int]]] = {}
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "stream": True,
    }

    async def one() -> None:
        rows = received[uuid.uuid4().hex] = []
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices") and event["choices"][0]["delta"].get("content"):
                        rows.append((time.monotonic(), 1))

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return received


# --- analysis ----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bursty(times: list[float]) -> bool:
    """All of a stream's chunks within BURST_WINDOW_S of its first (the symptom being chased)."""
    return len(times) > 1 and times[-1] - times[0] < BURST_WINDOW_S


def client_summary(received: dict[str, list[tuple[float, int]]]) -> dict[str, Any]:
    spans = [rows[-1][0] - rows[0][0] for rows in received.values() if rows]
    gaps = [b[0] - a[0] for rows in received.values() for a, b in itertools.pairwise(rows)]
    return {
        "streams": len(received),
        "bursty": sum(bursty([t for t, _ in rows]) for rows in received.values()),
        "chunks_per_stream": statistics.mean(len(r) for r in received.values()),
        "span_ms_p50": 1000 * pct(spans, 0.5),
        "span_ms_min": 1000 * min(spans),
        "gap_ms_p50": 1000 * pct(gaps, 0.5),
        "gap_ms_p99": 1000 * pct(gaps, 0.99),
        "gap_ms_max": 1000 * max(gaps),
    }


def token_times(rows: list[tuple[float, int]]) -> list[float]:
    """One timestamp per token: a chunk of n tokens stamps n tokens."""
    return [t for t, n in rows for _ in range(n)]


def stage_summary(trace: dict[str, Any], received: dict[str, list[tuple[float, int]]]) -> dict[str, Any]:
    """Per-token lag from the engine step that produced it to each later stage, in ms."""
    steps: dict[str, list[tuple[float, int]]] = defaultdict(list)
    recvs: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for step_t, recv_t, per in trace["steps"]:
        for rid, n in per:
            if n:
                steps[rid].append((step_t, n))
                recvs[rid].append((recv_t, n))
    merged = sum(1 for rid, _, m in trace["puts"] if m and rid.split("-")[0] in received)
    lags: dict[str, list[float]] = defaultdict(list)
    spans: dict[str, list[float]] = defaultdict(list)
    burst_rows = []
    for rid, client_rows in received.items():
        # vLLM may suffix its internal id; match ours by prefix.
        key = next((k for k in steps if k.startswith(rid)), None)
        chunks = trace["chunks"].get(rid)
        if key is None or not chunks:
            continue
        stages = {
            "step": token_times(steps[key]),
            "recv": token_times(recvs[key]),
            "get": token_times([(g, n) for g, _, n in chunks]),
            "sent": token_times([(s, n) for _, s, n in chunks]),
            "client": token_times(client_rows),
        }
        base = stages["step"]
        for name, times in stages.items():
            if len(times) != len(base):
                continue
            lags[name] += [t - b for t, b in zip(times, base, strict=True)]
            spans[name].append(times[-1] - times[0])
        if bursty([t for t, _ in client_rows]):
            burst_rows.append(
                {name: round(1000 * (t[-1] - t[0]), 1) for name, t in stages.items()}
                | {"first_token_wait_ms": round(1000 * (client_rows[0][0] - base[0]), 1)}
            )
    return {
        "lag_ms": {
            name: {"p50": 1000 * pct(v, 0.5), "p99": 1000 * pct(v, 0.99), "max": 1000 * max(v)}
            for name, v in lags.items()
        },
        "span_ms_p50": {name: 1000 * pct(v, 0.5) for name, v in spans.items()},
        "span_ms_min": {name: 1000 * min(v) for name, v in spans.items()},
        "merged_puts": merged,
        "bursty_streams_spans_ms": burst_rows,
    }


# --- orchestration -----------------------------------------------------------------------------


def _env() -> dict[str, str]:
    root = Path(__file__).resolve().parents[3]
    paths = [str(root / "services"), str(root / "gen"), str(root / "bench"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "VLLM_CPU_KVCACHE_SPACE": "1"}


def write_text(path: Path, text: str) -> None:
    path.write_text(text)


def read_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def start_child(argv: list[str], out: Path, log_name: str) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / log_name).open("wb") as log:
        return subprocess.Popen(argv, env=_env(), stdout=log, stderr=subprocess.STDOUT)


async def wait_for_file(path: Path, proc: subprocess.Popen[Any], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text := read_text(path):
            return text
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        await asyncio.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout_s}s")


async def run(args: argparse.Namespace) -> None:
    out = Path(args.out or tempfile.mkdtemp(prefix="pacing-"))
    port_file, trace_file = out / "port", out / "trace.json"
    argv = [sys.executable, "-m", "llmesh.bench.pacing", "serve", "--model", args.model]
    argv += ["--port-file", str(port_file), "--max-num-seqs", str(args.max_num_seqs)]
    if not args.no_trace:
        argv += ["--trace", str(trace_file)]
    proc = start_child(argv, out, "worker.log")
    rounds: list[tuple[int, dict[str, list[tuple[float, int]]]]] = []
    try:
        address = f"127.0.0.1:{await wait_for_file(port_file, proc, 300)}"
        await grpc_round(address, 4, 8)  # warm-up
        for concurrency in args.concurrency:
            for _ in range(args.rounds):
                received = await grpc_round(address, concurrency, args.tokens, args.channels)
                rounds.append((concurrency, received))
                print(f"c={concurrency:<3} {json.dumps(client_summary(received))}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    if not args.no_trace:
        trace = json.loads(read_text(trace_file))
        for concurrency, received in rounds:
            print(f"c={concurrency:<3} stages {json.dumps(stage_summary(trace, received))}", flush=True)


async def baseline(args: argparse.Namespace) -> None:
    import aiohttp

    port = 8000 + os.getpid() % 1000
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    argv += ["--served-model-name", "tiny-llama", "--max-model-len", "2048", "--port", str(port)]
    argv += ["--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory-bytes", str(1 << 30)]
    argv += ["--enforce-eager", "--seed", "0"]
    out = Path(args.out or tempfile.mkdtemp(prefix="pacing-baseline-"))
    proc = start_child(argv, out, "vllm.log")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with aiohttp.ClientSession() as s, s.get(f"{base}/health") as r:
                    if r.status == 200:
                        break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("vLLM's server did not start; see " + str(out / "vllm.log"))
            await asyncio.sleep(1)
        await sse_round(base, 4, 8)
        for concurrency in args.concurrency:
            for _ in range(args.rounds):
                received = await sse_round(base, concurrency, args.tokens)
                print(f"vllm c={concurrency:<3} {json.dumps(client_summary(received))}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "baseline", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--max-num-seqs", type=int, default=64)
        if name == "serve":
            p.add_argument("--port-file", required=True)
            p.add_argument("--trace", default="")
        else:
            p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
            p.add_argument("--rounds", type=int, default=3)
            p.add_argument("--tokens", type=int, default=64)
            p.add_argument("--out", default="")
            p.add_argument("--no-trace", action="store_true")
            p.add_argument("--channels", type=int, default=0, help="0: one per stream")
    args = parser.parse_args()
    from llmesh.common.server import run as run_main

    if args.command == "serve":
        run_main(lambda: serve(args))
    else:
        asyncio.run({"run": run, "baseline": baseline}[args.command](args))


if __name__ == "__main__":
    main()
