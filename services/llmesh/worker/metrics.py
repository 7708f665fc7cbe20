"""A worker's inference metrics, under the names operators already query.

vLLM's own names (`vllm:time_to_first_token_seconds`, `vllm:prompt_tokens_total`, ...), labelled
`model_name` and `worker`, for every engine: the servicer times each stream where its chunks
arrive, so llama.cpp, the OpenAI relay and vLLM report alike. The engine-state gauges (running,
waiting, KV-cache use) are read from the engine's load report when Prometheus scrapes, so they cost
nothing in between. vLLM alone also reports prefix-cache queries/hits and queue time, from the
stats it sends every engine step. Beside them, the OpenTelemetry GenAI server histograms with the
buckets the semantic convention gives (`gen_ai_server_time_to_first_token_seconds`, ...).

Cost on the token path: per chunk one `perf_counter()` and one histogram observe (inter-token
latency; the first chunk observes time to first token instead); everything else once per request.
Every labelled child is bound when the servicer is built, so no label lookup happens per request.
When tracing is on, the request's end also puts the GenAI attributes (model, token usage, finish
reasons) on the RPC's server span.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry import trace
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmesh.common.metrics import (
    GENAI_DURATION_BUCKETS,
    GENAI_TOKEN_BUCKETS,
    GENAI_TPOT_BUCKETS,
    GENAI_TTFT_BUCKETS,
    REGISTRY,
    on_loop,
    running_loop,
)
from llmesh.worker.engine import EngineLoad, GenerationChunk

log = logging.getLogger(__name__)

_LABELS = ("model_name", "worker")
_GENAI = ("gen_ai_operation_name", "gen_ai_request_model", "worker")
FINISH_REASONS = ("stop", "length", "abort", "error")
OPERATIONS = ("chat", "text_completion")

# vLLM's buckets for the same histograms (vllm/v1/metrics/loggers.py), so dashboards built for vLLM
# read ours the same way.
_VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_VLLM_REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

TIME_TO_FIRST_TOKEN = Histogram(
    "vllm:time_to_first_token_seconds",
    "Time from the worker receiving a request to its first chunk of output.",
    _LABELS,
    buckets=_VLLM_TTFT_BUCKETS,
    registry=REGISTRY,
)
INTER_TOKEN_LATENCY = Histogram(
    "vllm:inter_token_latency_seconds",
    "Time between successive output chunks of a stream (one engine step each, unless the "
    "consumer lagged and the engine merged steps).",
    _LABELS,
    buckets=_VLLM_ITL_BUCKETS,
    registry=REGISTRY,
)
E2E_LATENCY = Histogram(
    "vllm:e2e_request_latency_seconds",
    "Time from the worker receiving a request to its end (finished, cancelled or failed).",
    _LABELS,
    buckets=_VLLM_REQUEST_BUCKETS,
    registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    "vllm:request_queue_time_seconds",
    "Time a request waited in the engine's queue before it was scheduled (vLLM engines).",
    _LABELS,
    buckets=_VLLM_REQUEST_BUCKETS,
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "vllm:prompt_tokens", "Prompt tokens of the requests this worker served.", _LABELS, registry=REGISTRY
)
GENERATION_TOKENS = Counter(
    "vllm:generation_tokens",
    "Tokens this worker generated (also those of streams cancelled midway).",
    _LABELS,
    registry=REGISTRY,
)
REQUEST_SUCCESS = Counter(
    "vllm:request_success",
    "Requests that ended, by the finish reason of their first choice (abort: cancelled).",
    (*_LABELS, "finished_reason"),
    registry=REGISTRY,
)
PREFIX_CACHE_QUERIES = Counter(
    "vllm:prefix_cache_queries",
    "Prompt tokens looked up in the prefix cache (vLLM engines).",
    _LABELS,
    registry=REGISTRY,
)
PREFIX_CACHE_HITS = Counter(
    "vllm:prefix_cache_hits",
    "Prompt tokens found in the prefix cache (vLLM engines).",
    _LABELS,
    registry=REGISTRY,
)

GENAI_TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "OpenTelemetry gen_ai.server.time_to_first_token: time to generate the first token.",
    _GENAI,
    buckets=GENAI_TTFT_BUCKETS,
    registry=REGISTRY,
)
GENAI_TIME_PER_OUTPUT_TOKEN = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "OpenTelemetry gen_ai.server.time_per_output_token: decode time per output token after the "
    "first, one observation per request.",
    _GENAI,
    buckets=GENAI_TPOT_BUCKETS,
    registry=REGISTRY,
)
GENAI_REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration_seconds",
    "OpenTelemetry gen_ai.server.request.duration: time to last byte or the last output token.",
    _GENAI,
    buckets=GENAI_DURATION_BUCKETS,
    registry=REGISTRY,
)
GENAI_TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "OpenTelemetry gen_ai.client.token.usage: input and output tokens per request, as served here.",
    (*_GENAI, "gen_ai_token_type"),
    buckets=GENAI_TOKEN_BUCKETS,
    registry=REGISTRY,
)


class _EngineLoadCollector(Collector):
    """`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
    read from each live engine's load report at scrape time, on the engine's event loop (a load
    report may update the engine's own bookkeeping, which only that loop touches)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # taken by scrapes and servicer construction, never per token
        self._sources: dict[
            tuple[str, str],
            tuple[weakref.WeakMethod[Callable[[], EngineLoad]], asyncio.AbstractEventLoop | None],
        ] = {}

    def watch(self, model: str, worker: str, load: Callable[[], EngineLoad]) -> None:
        with self._lock:
            self._sources[(model, worker)] = (weakref.WeakMethod(load), running_loop())  # type: ignore[arg-type]

    def describe(self) -> list[Metric]:
        return list(self._families())

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("vllm:num_requests_running", "Requests the engine is running.", labels=_LABELS),
            GaugeMetricFamily(
                "vllm:num_requests_waiting", "Requests waiting in the engine's queue.", labels=_LABELS
            ),
            GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache use, 0 to 1 (1 = full).", labels=_LABELS),
        ]

    def collect(self) -> Iterator[Metric]:
        running, waiting, kv = self._families()
        with self._lock:
            sources = list(self._sources.items())
        for (model, worker), (ref, loop) in sources:
            load_of = ref()
            if load_of is None:
                continue
            try:
                load = on_loop(loop, load_of)
            except Exception:  # an engine shutting down, a loop too busy; the series just pauses
                log.debug("engine load unavailable for %s", worker, exc_info=True)
                continue
            running.add_metric([model, worker], load.running)
            waiting.add_metric([model, worker], load.waiting)
            kv.add_metric([model, worker], load.kv_cache_usage)
        yield from (running, waiting, kv)


ENGINE_LOAD = _EngineLoadCollector()
REGISTRY.register(ENGINE_LOAD)


class _OperationChildren:
    """The GenAI histograms of one operation, bound."""

    __slots__ = ("duration", "input_tokens", "model", "operation", "output_tokens", "tpot", "ttft")

    def __init__(self, operation: str, model: str, worker: str) -> None:
        self.operation, self.model = operation, model
        labels = (operation, model, worker)
        self.ttft = GENAI_TIME_TO_FIRST_TOKEN.labels(*labels)
        self.tpot = GENAI_TIME_PER_OUTPUT_TOKEN.labels(*labels)
        self.duration = GENAI_REQUEST_DURATION.labels(*labels)
        self.input_tokens = GENAI_TOKEN_USAGE.labels(*labels, "input")
        self.output_tokens = GENAI_TOKEN_USAGE.labels(*labels, "output")


class InferenceMetrics:
    """One worker's inference metrics for its model, every labelled child bound up front."""

    def __init__(self, model: str, worker: str, engine: Any = None) -> None:
        labels = (model, worker)
        self.ttft = TIME_TO_FIRST_TOKEN.labels(*labels)
        self.itl = INTER_TOKEN_LATENCY.labels(*labels)
        self.e2e = E2E_LATENCY.labels(*labels)
        self.queue = QUEUE_TIME.labels(*labels)
        self.prompt_tokens = PROMPT_TOKENS.labels(*labels)
        self.generation_tokens = GENERATION_TOKENS.labels(*labels)
        self.prefix_queries = PREFIX_CACHE_QUERIES.labels(*labels)
        self.prefix_hits = PREFIX_CACHE_HITS.labels(*labels)
        self.finished = {reason: REQUEST_SUCCESS.labels(*labels, reason) for reason in FINISH_REASONS}
        self.operations = {op: _OperationChildren(op, model, worker) for op in OPERATIONS}
        if engine is not None:
            ENGINE_LOAD.watch(model, worker, engine.load)
            # vLLM reports queue time and prefix-cache use with its per-step stats.
            subscribe = getattr(engine, "on_engine_stats", None)
            if subscribe is not None:
                subscribe(self.engine_step)

    def stream(self, operation: str) -> StreamClock:
        """Start timing one request (call at its arrival)."""
        return StreamClock(self, self.operations[operation])

    def embedded(self, prompt_tokens: int) -> None:
        """An embeddings request served: prompt tokens only, finished with stop (as vLLM counts a
        pooling request)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.finished["stop"].inc()

    def engine_step(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """vLLM's stats of one engine step (its stat logger's `record`)."""
        prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
        if prefix is not None and prefix.queries:
            self.prefix_queries.inc(prefix.queries)
            self.prefix_hits.inc(prefix.hits)
        for finished in getattr(iteration_stats, "finished_requests", None) or ():
            self.queue.observe(max(0.0, float(finished.queued_time)))


class StreamClock:
    """Times one request's chunks; `end` records it once."""

    __slots__ = ("_first", "_last", "_metrics", "_op", "_start", "reason")

    def __init__(self, metrics: InferenceMetrics, op: _OperationChildren) -> None:
        self._metrics, self._op = metrics, op
        self._start = time.perf_counter()
        self._first = 0.0
        self._last = 0.0
        self.reason: str | None = None

    def chunk(self, chunk: GenerationChunk) -> None:
        """A chunk arrived from the engine: the only per-chunk work."""
        now = time.perf_counter()
        if self._last:
            self._metrics.itl.observe(now - self._last)
        else:
            self._first = now
            self._metrics.ttft.observe(now - self._start)
        self._last = now
        if chunk.finished and chunk.choices:
            self.reason = chunk.choices[0].finish_reason

    def timing(self) -> tuple[float, float] | None:
        """(arrival to first chunk, first to last chunk) in seconds; None before a first chunk."""
        if not self._first:
            return None
        return self._first - self._start, self._last - self._first

    def end(self, prompt_tokens: int, completion_tokens: int, error: BaseException | None) -> None:
        """The request is over (`error`: why it stopped early, if it did)."""
        m, op = self._metrics, self._op
        now = time.perf_counter()
        reason = self.reason
        if reason is None:
            failed = error is not None and not isinstance(error, asyncio.CancelledError | GeneratorExit)
            reason = "error" if failed else "abort"
        # A choice that ended in tool calls stopped as the engine sees it (vLLM counts it so).
        m.finished.get("stop" if reason == "tool_calls" else reason, m.finished["error"]).inc()
        m.e2e.observe(now - self._start)
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(completion_tokens)
        op.duration.observe(now - self._start)
        op.input_tokens.observe(prompt_tokens)
        op.output_tokens.observe(completion_tokens)
        if self._first:
            op.ttft.observe(self._first - self._start)
            if completion_tokens > 1:
                op.tpot.observe((self._last - self._first) / (completion_tokens - 1))
        span = trace.get_current_span()  # the RPC's server span when tracing is on
        if span.is_recording():
            span.set_attributes(
                {
                    "gen_ai.operation.name": op.operation,
                    "gen_ai.request.model": op.model,
                    "gen_ai.response.model": op.model,
                    "gen_ai.usage.input_tokens": prompt_tokens,
                    "gen_ai.usage.output_tokens": completion_tokens,
                    "gen_ai.response.finish_reasons": [reason],
                }
            )
