"""Where a request's usage is settled when its trailers never reach the picker.

A stream the client cancels (or whose worker is killed) ends without the worker's trailers, so the
picker does not know what was produced. The worker does: on a cancel it reports its usage with
`Release(lease_id, tokens)`. That report can come before or after the picker sees the stream end;
the desk matches the two by lease id and hands the sink one report per request either way — with
the worker's numbers when they come within `wait_s`, else the picker's own (prompt estimate, no
completion: a worker that died said nothing).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from llmesh.scheduler import metrics
from llmesh.scheduler.traffic import TrafficSummary
from llmesh.scheduler.usage import UsageReport, UsageSink

log = logging.getLogger(__name__)

# Worker reports that arrived before their stream's end, kept this long for it.
_EARLY_KEEP_S = 60.0


class UsageDesk:
    """Passes usage reports to the sink exactly once per request, filling in the worker's numbers
    for streams that ended without trailers."""

    def __init__(self, sink: UsageSink, wait_s: float = 2.0, traffic: TrafficSummary | None = None) -> None:
        self._sink = sink
        self._traffic = traffic
        self._wait_s = wait_s
        self._awaiting: dict[str, tuple[UsageReport, asyncio.TimerHandle]] = {}
        self._early: dict[str, tuple[int, int, float]] = {}

    def report(self, report: UsageReport) -> None:
        """A finished request whose usage is known (the trailers carried it)."""
        metrics.USAGE_TOKENS.labels(report.model, "prompt").inc(report.prompt_tokens)
        metrics.USAGE_TOKENS.labels(report.model, "completion").inc(report.completion_tokens)
        # A report without a worker settles a request refused before any lease (the picker
        # counted it as refused): not a finished request.
        if self._traffic is not None and report.worker_id:
            self._traffic.finished(
                report.model, report.status, report.prompt_tokens, report.completion_tokens, report.timing_s
            )
        try:
            self._sink.record(report)
        except Exception:  # accounting must never break the lease bookkeeping
            log.exception("usage report failed for %s", report.request_id)

    def report_untrailed(self, lease_id: str, report: UsageReport) -> None:
        """A request that ended without trailers: wait briefly for its worker's numbers."""
        early = self._early.pop(lease_id, None)
        if early is not None:
            self.report(dataclasses.replace(report, prompt_tokens=early[0], completion_tokens=early[1]))
            return
        timer = asyncio.get_running_loop().call_later(self._wait_s, self._give_up, lease_id)
        self._awaiting[lease_id] = (report, timer)

    def worker_usage(self, lease_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        """The worker's count for a stream that was cancelled (from Release)."""
        waiting = self._awaiting.pop(lease_id, None)
        if waiting is not None:
            report, timer = waiting
            timer.cancel()
            self.report(
                dataclasses.replace(report, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            )
            return
        now = time.monotonic()
        for stale in [k for k, (_, _, at) in self._early.items() if now - at > _EARLY_KEEP_S]:
            del self._early[stale]
        self._early[lease_id] = (prompt_tokens, completion_tokens, now)

    def _give_up(self, lease_id: str) -> None:
        waiting = self._awaiting.pop(lease_id, None)
        if waiting is not None:
            self.report(waiting[0])

    def flush(self) -> None:
        """Report everything still waiting (shutting down)."""
        for lease_id in list(self._awaiting):
            self._awaiting[lease_id][1].cancel()
            self._give_up(lease_id)
