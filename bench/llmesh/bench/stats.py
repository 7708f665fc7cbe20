"""Per-request samples of a streamed generation and their summary, computed as vLLM's own serving
benchmark client computes them (`vllm.benchmarks.serve.calculate_metrics`), so the gRPC target and
the OpenAI-API targets (measured by vLLM's client) are read the same way:

- TTFT: request sent → first message carrying a choice (vLLM's server sends the role with the first
  token; llmesh does too);
- ITL: the gaps between consecutive messages carrying a choice (one per message, not per token);
- TPOT: per request, (last message - first message) / (output tokens - 1);
- output tokens/s: the completion tokens of the successful requests / the run's duration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestSample:
    """Timestamps (time.perf_counter, seconds) and counts of one streamed request."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each message carrying a choice
    tokens: int = 0  # completion tokens the server reported (usage)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunks)

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        if len(self.chunks) < 1 or self.tokens < 2:
            return None
        return (self.chunks[-1] - self.chunks[0]) / (self.tokens - 1)

    @property
    def latency_s(self) -> float | None:
        return self.chunks[-1] - self.sent if self.chunks else None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _dist_ms(values_s: Sequence[float]) -> dict[str, float]:
    out = {f"p{q}": percentile(values_s, q) * 1000.0 for q in PERCENTILES}
    out["mean"] = sum(values_s) / len(values_s) * 1000.0 if values_s else math.nan
    return out


def level_summary(
    *,
    duration_s: float,
    ttft_s: Sequence[float],
    tpot_s: Sequence[float],
    itl_s: Sequence[float],
    latency_s: Sequence[float],
    output_tokens: Sequence[int],
    chunks: int,
    errors: Sequence[str],
    client: str,
) -> dict[str, Any]:
    """One level's numbers in one shape, whichever client measured them (ours or vLLM's)."""
    completed = len(ttft_s)
    tokens = sum(output_tokens)
    duration = max(duration_s, 1e-9)
    return {
        "client": client,
        "completed": completed,
        "failed": len(errors),
        "error_examples": sorted({e.strip().splitlines()[-1][:300] if e.strip() else "?" for e in errors})[
            :5
        ],
        "duration_s": duration_s,
        "requests_per_s": completed / duration,
        "output_tokens_per_s": tokens / duration,
        "output_tokens": tokens,
        "chunks": chunks,
        "tokens_per_chunk": tokens / chunks if chunks else math.nan,
        "ttft_ms": _dist_ms(ttft_s),
        "tpot_ms": _dist_ms(tpot_s),
        "itl_ms": _dist_ms(itl_s),
        "e2el_ms": _dist_ms(latency_s),
        "raw": {
            "ttft_ms": [round(v * 1000.0, 3) for v in ttft_s],
            "tpot_ms": [round(v * 1000.0, 3) for v in tpot_s],
            "output_tokens": list(output_tokens),
        },
    }


def summarize(
    samples: Sequence[RequestSample], duration_s: float, client: str = "llmesh grpc"
) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    return level_summary(
        duration_s=duration_s,
        ttft_s=[s.ttft_s for s in ok if s.ttft_s is not None],
        tpot_s=[t for s in ok if (t := s.tpot_s) is not None],
        itl_s=[gap for s in ok for gap in s.itl_s],
        latency_s=[s.latency_s for s in ok if s.latency_s is not None],
        output_tokens=[s.tokens for s in ok],
        chunks=sum(len(s.chunks) for s in ok),
        errors=[s.error or "no output" for s in samples if not s.ok],
        client=client,
    )


def summarize_vllm(result: dict[str, Any]) -> dict[str, Any]:
    """The same summary from vLLM's result JSON (`--save-result --save-detailed`)."""
    ttfts = result.get("ttfts") or []
    itls = result.get("itls") or []
    latencies = result.get("latencies") or []
    lens = result.get("output_lens") or []
    errors = result.get("errors") or []
    ok = [i for i, e in enumerate(errors) if not e] if errors else list(range(len(ttfts)))
    ttft = [ttfts[i] for i in ok]
    tpot = [
        (latencies[i] - ttfts[i]) / (lens[i] - 1) for i in ok if i < len(lens) and lens[i] and lens[i] > 1
    ]
    return level_summary(
        duration_s=float(result.get("duration", math.nan)),
        ttft_s=ttft,
        tpot_s=tpot,
        itl_s=[gap for i in ok for gap in itls[i]],
        latency_s=[latencies[i] for i in ok],
        output_tokens=[lens[i] for i in ok if i < len(lens)],
        chunks=sum(len(itls[i]) + 1 for i in ok),
        errors=[e for e in errors if e],
        client="vllm.benchmarks.serve",
    )
