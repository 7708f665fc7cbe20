"""Closed-loop load: `concurrency` streams, each sending its next request when the last one ends.

Bounded in count (`requests`) and in time (`time_limit_s`: no new request starts after it, and
requests still running a request timeout later are cancelled and counted as errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from llmesh.bench.clients import StreamClient
from llmesh.bench.stats import RequestSample


@dataclass
class LevelRun:
    """The samples of one level and the wall time from the first send to the last completion."""

    concurrency: int
    samples: list[RequestSample]
    wall_s: float
    timed_out: bool


async def run_level(
    client: StreamClient,
    concurrency: int,
    requests: int,
    *,
    time_limit_s: float,
    grace_s: float = 30.0,
) -> LevelRun:
    """Send `requests` requests over `concurrency` concurrent streams (closed loop)."""
    samples: list[RequestSample] = []
    issued = 0
    began = time.perf_counter()
    stop_issuing = began + time_limit_s

    async def lane() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < stop_issuing:
            issued += 1
            sample = RequestSample(sent=time.perf_counter())
            samples.append(sample)
            try:
                await client(sample)
            except asyncio.CancelledError:
                sample.error = sample.error or "cancelled: the level ran past its time limit"
                sample.done = time.perf_counter()
                raise
            except Exception as error:  # a client bug must not abort the whole run
                sample.error = f"{type(error).__name__}: {error}"[:300]
            sample.done = time.perf_counter()

    lanes = [asyncio.create_task(lane()) for _ in range(max(1, min(concurrency, requests)))]
    done, pending = await asyncio.wait(lanes, timeout=time_limit_s + grace_s)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for task in done:
        task.result()
    ends = [s.done for s in samples if s.done is not None]
    wall = (max(ends) if ends else time.perf_counter()) - began
    return LevelRun(concurrency, samples, wall, timed_out=bool(pending) or issued < requests)


async def warm_up(
    client: StreamClient, requests: int, concurrency: int = 4, time_limit_s: float = 120.0
) -> int:
    """A few untimed requests (connections, caches, allocator); returns how many failed."""
    if requests <= 0:
        return 0
    run = await run_level(client, concurrency, requests, time_limit_s=time_limit_s)
    return sum(1 for s in run.samples if not s.ok)


async def wait_until_serving(
    client: StreamClient, timeout_s: float = 120.0, interval_s: float = 0.5
) -> str | None:
    """Send single requests until one succeeds (the worker may still be joining); the last error
    if none did within `timeout_s`, else None."""
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        sample = RequestSample(sent=time.perf_counter())
        await client(sample)
        if sample.ok:
            return None
        last = sample.error or "no output"
        await asyncio.sleep(interval_s)
    return last
