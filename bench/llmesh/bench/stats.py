"""Per-request samples of a streamed generation and their summaries (percentiles, rates)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class RequestSample:
    """Timestamps (time.perf_counter, seconds) and counts of one streamed request.

    `first` is when the first message carrying generated output arrived, `last` the last such
    message; `tokens` is the completion token count the server reported (usage).
    """

    sent: float
    first: float | None = None
    last: float | None = None
    done: float | None = None
    tokens: int = 0
    messages: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.first is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (last - first) / (tokens - 1)."""
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        return (self.last - self.first) / (self.tokens - 1)

    @property
    def latency_s(self) -> float | None:
        return None if self.done is None else self.done - self.sent


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(values: Sequence[float]) -> list[float]:
    return [round(v * 1000.0, 4) for v in values]


def summarize(samples: Sequence[RequestSample], wall_s: float) -> dict[str, Any]:
    """Rates over `wall_s`, latency percentiles in milliseconds, and the raw per-request numbers."""
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    tpot = [s.tpot_s for s in ok if s.tpot_s is not None]
    tokens = sum(s.tokens for s in ok)
    messages = sum(s.messages for s in ok)
    errors = [s.error for s in samples if not s.ok]
    wall = max(wall_s, 1e-9)
    return {
        "requests": len(samples),
        "completed": len(ok),
        "errors": len(errors),
        "error_examples": sorted(set(e or "no output" for e in errors))[:5],
        "wall_s": round(wall_s, 4),
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": tokens / wall,
        "messages_per_s": messages / wall,
        "output_tokens": tokens,
        "messages": messages,
        "tokens_per_message": tokens / messages if messages else math.nan,
        "ttft_ms": {f"p{q}": percentile(ttft, q) * 1000.0 for q in (50, 90, 99)}
        | {"mean": (sum(ttft) / len(ttft) * 1000.0) if ttft else math.nan},
        "tpot_ms": {f"p{q}": percentile(tpot, q) * 1000.0 for q in (50, 99)},
        "raw": {
            "ttft_ms": _ms(ttft),
            "tpot_ms": _ms(tpot),
            "latency_ms": _ms([s.latency_s for s in ok if s.latency_s is not None]),
            "tokens": [s.tokens for s in ok],
        },
    }
