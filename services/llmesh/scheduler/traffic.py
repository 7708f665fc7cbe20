"""The traffic the endpoint picker has seen, summed up for `GET /v1/monitoring/metrics`.

Every request Envoy sends through the picker ends here exactly once: without a lease (refused at
the pick, with the status it was refused with, or cancelled while it queued) or finished (the usage desk's one report per request, with
the tokens accounted and the worker's timing from its trailers). Counts run since the scheduler
started; latency percentiles are exact (sorted samples, nearest rank) over a recent window, from
at most `MAX_SAMPLES` requests per model kept in memory.

Requests that reach the scheduler's Acquire/Release directly (not through the edge) and requests
AuthService refuses before the picker are not in it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmesh.common.errors import InvalidRequest
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2

if TYPE_CHECKING:
    from llmesh.scheduler.pool import WorkerPool

DEFAULT_WINDOW_S = 300
MAX_WINDOW_S = 3600
MAX_SAMPLES = 20_000
# Requests refused before their model resolved (an unknown name): one bucket, so a caller cannot
# grow the summary by sending made-up model names.
UNRESOLVED = "(unresolved)"


@dataclass(frozen=True)
class Percentiles:
    """p50/p90/p99 in milliseconds of `samples` values (all 0 when there are none)."""

    samples: int
    p50_ms: float
    p90_ms: float
    p99_ms: float


def percentiles(values_s: list[float]) -> Percentiles:
    """Nearest-rank percentiles of `values_s` (seconds), in milliseconds."""
    if not values_s:
        return Percentiles(0, 0.0, 0.0, 0.0)
    ordered = sorted(values_s)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000

    return Percentiles(len(ordered), rank(50), rank(90), rank(99))


@dataclass
class ModelTotals:
    """One model's counts since start and its recent latency samples."""

    by_status: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # (monotonic time the request ended, time to first token s, time per output token s or None)
    latencies: deque[tuple[float, float, float | None]] = field(
        default_factory=lambda: deque(maxlen=MAX_SAMPLES)
    )

    @property
    def requests(self) -> int:
        return sum(self.by_status.values())


@dataclass(frozen=True)
class ModelView:
    """One model's line of the summary."""

    model: str
    totals: ModelTotals
    ttft: Percentiles
    tpot: Percentiles


def window_of(requested_s: int) -> int:
    """The percentile window for a request's `window_seconds` (0: the default)."""
    if requested_s == 0:
        return DEFAULT_WINDOW_S
    if not 1 <= requested_s <= MAX_WINDOW_S:
        raise InvalidRequest(
            f"window_seconds {requested_s} is out of range: give 1 to {MAX_WINDOW_S}, or 0 for {DEFAULT_WINDOW_S}"
        )
    return requested_s


class TrafficSummary:
    """Requests, tokens and latencies per model, fed by the picker and the usage desk."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.since = time.time()
        self._models: dict[str, ModelTotals] = {}

    def _totals(self, model: str) -> ModelTotals:
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = ModelTotals()
        return found

    def unleased(self, model: str, status: str) -> None:
        """A request that ended without a lease: the picker answered it itself (no worker, queue
        full, bad body, ...), or its client went away while it queued (CANCELLED)."""
        totals = self._totals(model or UNRESOLVED)
        totals.by_status[status] = totals.by_status.get(status, 0) + 1

    def finished(
        self,
        model: str,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        timing_s: tuple[float, float] | None,
    ) -> None:
        """A leased request ended: its final status, the tokens accounted and, when the worker
        sent them, (time to first token, first to last token) in seconds."""
        totals = self._totals(model)
        totals.by_status[status] = totals.by_status.get(status, 0) + 1
        totals.prompt_tokens += prompt_tokens
        totals.completion_tokens += completion_tokens
        if timing_s is not None:
            first, decode = timing_s
            tpot = decode / (completion_tokens - 1) if completion_tokens > 1 else None
            totals.latencies.append((self._clock(), first, tpot))

    def view(self, window_s: int) -> list[ModelView]:
        """Every model seen, by name, with percentiles over the last `window_s` seconds."""
        since = self._clock() - window_s
        views = []
        for model in sorted(self._models):
            totals = self._models[model]
            recent = [(first, tpot) for ended, first, tpot in totals.latencies if ended >= since]
            views.append(
                ModelView(
                    model,
                    totals,
                    percentiles([first for first, _ in recent]),
                    percentiles([tpot for _, tpot in recent if tpot is not None]),
                )
            )
        return views


def _latency(p: Percentiles) -> scheduler_pb2.LatencyPercentiles:
    return scheduler_pb2.LatencyPercentiles(
        samples=p.samples, p50_ms=p.p50_ms, p90_ms=p.p90_ms, p99_ms=p.p99_ms
    )


def summary_response(
    traffic: TrafficSummary, pool: WorkerPool, window_s: int
) -> scheduler_pb2.GetMetricsSummaryResponse:
    """The summary: `traffic`'s counts and percentiles, the pool's queues and workers as they are now."""
    reply = scheduler_pb2.GetMetricsSummaryResponse(window_seconds=window_s)
    reply.since.FromNanoseconds(int(traffic.since * 1e9))
    queues = {model: (waiting, active) for model, waiting, active, _ in pool.queue_view()}
    views = {view.model: view for view in traffic.view(window_s)}
    for model in sorted(set(views) | set(queues)):
        view = views.get(model)
        totals = view.totals if view is not None else ModelTotals()
        waiting, active = queues.get(model, (0, 0))
        line = reply.models.add(
            model=model,
            requests=totals.requests,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            waiting=waiting,
            active=active,
        )
        line.requests_by_status.update(totals.by_status)
        if view is not None:
            line.time_to_first_token.CopyFrom(_latency(view.ttft))
            line.time_per_output_token.CopyFrom(_latency(view.tpot))
        reply.requests += totals.requests
        reply.prompt_tokens += totals.prompt_tokens
        reply.completion_tokens += totals.completion_tokens
        for status, n in totals.by_status.items():
            reply.requests_by_status[status] += n
    for worker in pool.workers():
        state = pool.worker_state(worker)
        reply.workers_by_state[state] += 1
        reply.workers.add(
            worker_id=worker.worker_id,
            state=state,
            models=sorted(worker.models),
            active_requests=worker.active,
            capacity=worker.capacity,
            running_requests=worker.running_requests,
            waiting_requests=worker.waiting_requests,
            kv_cache_usage=worker.kv_cache_usage,
        )
    return reply
