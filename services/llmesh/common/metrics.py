"""Prometheus metrics: llmesh's own registry and the `/metrics` side port every process serves.

llmesh keeps its metrics in a registry of its own rather than prometheus-client's global one: vLLM
registers its own `vllm:*` collectors in the global registry inside the worker process, and the
worker re-exports those names with llmesh's labels (`model_name`, `worker`); two registrations of
one name in one registry would collide. Every metric llmesh defines lives in `REGISTRY`, so the
names a dashboard may query are exactly `exposed_names()` (tests check the dashboards with it).

The side server is prometheus-client's threaded WSGI server: scrapes run on their own thread and
never wait for the event loop; metric updates on the loop are plain in-memory increments.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

REGISTRY = CollectorRegistry(auto_describe=True)
"""Every llmesh metric, and the process/GC/platform collectors (`process_cpu_seconds_total`, ...)."""

for _standard in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
    REGISTRY.register(_standard)

# OpenTelemetry GenAI semantic conventions (gen-ai-metrics.md): the explicit bucket boundaries each
# metric "SHOULD" use.
GENAI_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
GENAI_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
GENAI_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
GENAI_TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip

# Sample-name suffixes each metric type exposes, for `exposed_names`.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


def exposed_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """Every sample name `registry` can expose (a histogram `x` gives `x_bucket`, `x_sum`, ...),
    whether or not a labelled child has been created yet."""
    names: set[str] = set()
    for collector in list(registry._collector_to_names):  # no public walk over collectors
        describe = getattr(collector, "describe", None)
        families = describe() if describe is not None else []
        if not families:
            families = list(collector.collect())
        for family in families:
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


@dataclass
class MetricsEndpoint:
    """A running `/metrics` side server."""

    host: str
    port: int
    _server: WSGIServer

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving (tests; a process just exits)."""
        self._server.shutdown()
        self._server.server_close()


def start_metrics_endpoint(listen: str, registry: CollectorRegistry = REGISTRY) -> MetricsEndpoint:
    """Serve `registry` on `listen` ("host:port"; port 0 picks a free one), on a daemon thread."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        server, _thread = start_http_server(int(port), addr=host, registry=registry)
    except OSError as e:
        raise OSError(f"metrics: cannot listen on {listen}: {e.strerror}; pick another port") from None
    endpoint = MetricsEndpoint(host, int(server.server_port), server)
    log.info("metrics listening", extra={"metrics_url": endpoint.url})
    return endpoint


def on_loop(loop: asyncio.AbstractEventLoop | None, read: Callable[[], T], timeout_s: float = 2.0) -> T:
    """Run `read` on `loop`'s thread and return its result: collectors that read live state (which
    the event loop changes without locks) call this from the scrape thread. Runs `read` directly
    when already on that loop, or when there is no loop to ask."""
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if loop is None or here is loop or loop.is_closed():
        return read()
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def call() -> None:
        try:
            done.set_result(read())
        except BaseException as e:
            done.set_exception(e)

    loop.call_soon_threadsafe(call)
    return done.result(timeout=timeout_s)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop of the calling code, if any (collectors remember where their state lives)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def serve_metrics(listen: str) -> dict[str, object]:
    """Start this process's side port when `listen` is set ("" when metrics are off); returns the
    ready-file fields that announce it (`metrics_port`, `metrics_url`)."""
    if not listen:
        return {}
    endpoint = start_metrics_endpoint(listen)
    return {"metrics_port": endpoint.port, "metrics_url": endpoint.url}
