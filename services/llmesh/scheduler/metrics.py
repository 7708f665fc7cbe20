"""The scheduler's metrics: queues, leases, lease decisions, workers by state, usage by model.

Gauges (queue depth, leases in flight, workers by state) are read from the pool when Prometheus
scrapes, so they can never drift from the pool's own bookkeeping; counters and the queue-wait
histogram are bumped where the pool decides, once per request. No label carries a user, tenant or
request id: cardinality stays models x priorities x outcomes.

`llmesh_scheduler_queue_depth` is what the workers' autoscalers (KEDA, prometheus-adapter in
k8s/components) scale on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmesh.common.metrics import REGISTRY, on_loop, running_loop
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2

if TYPE_CHECKING:
    from llmesh.scheduler.pool import WorkerPool

log = logging.getLogger(__name__)

_QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)

LEASE_DECISIONS = Counter(
    "llmesh_scheduler_lease_decisions",
    "Acquire decisions: granted, queue_full, wait_timeout (both RESOURCE_EXHAUSTED), no_worker "
    "(UNAVAILABLE: no live worker serves the model).",
    ("model", "outcome"),
    registry=REGISTRY,
)
LEASE_RELEASES = Counter(
    "llmesh_scheduler_lease_releases",
    "Leases ended, by how their request ended (success, worker_failed, cancelled, rejected).",
    ("model", "outcome"),
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "llmesh_scheduler_queue_wait_seconds",
    "Time a granted request waited for capacity (0 when a worker was free at once).",
    ("model", "priority"),
    buckets=_QUEUE_WAIT_BUCKETS,
    registry=REGISTRY,
)
USAGE_TOKENS = Counter(
    "llmesh_usage_tokens",
    "Tokens of finished requests as accounted (what AuthService's ledger is charged), by model.",
    ("model", "type"),
    registry=REGISTRY,
)

WORKER_STATES = ("ready", "full", "ejected", "cordoned")


@dataclass
class PoolSnapshot:
    """What the pool gauges show, counted by the pool (`WorkerPool.metrics_snapshot`)."""

    waiting: dict[tuple[str, int], int] = field(default_factory=dict)  # (model, priority)
    leases: dict[str, int] = field(default_factory=dict)  # model
    workers: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, state)


def priority_label(priority: int) -> str:
    """low / normal / high (the API's names), or the number for anything else."""
    try:
        name = scheduler_pb2.Priority.Name(priority)  # type: ignore[arg-type]
    except ValueError:
        return str(priority)
    return "normal" if name == "PRIORITY_UNSPECIFIED" else name.removeprefix("PRIORITY_").lower()


def outcome_label(outcome: int) -> str:
    """success / worker_failed / cancelled / rejected / unspecified."""
    try:
        return scheduler_pb2.Outcome.Name(outcome).removeprefix("OUTCOME_").lower()  # type: ignore[arg-type]
    except ValueError:
        return str(outcome)


class _PoolCollector(Collector):
    """Queue depth, leases in flight and workers by state, read from the live pools at scrape time
    (one per scheduler process; tests may run several, whose numbers add up)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: weakref.WeakKeyDictionary[WorkerPool, asyncio.AbstractEventLoop | None] = (
            weakref.WeakKeyDictionary()
        )

    def watch(self, pool: WorkerPool) -> None:
        """Report `pool` from now on; it is read on the event loop this is called from."""
        with self._lock:
            self._pools[pool] = running_loop()

    def describe(self) -> list[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "llmesh_scheduler_queue_depth",
                "Requests waiting for a worker, by model and priority.",
                labels=("model", "priority"),
            ),
            GaugeMetricFamily(
                "llmesh_scheduler_leases_in_flight", "Leases granted and not yet released.", labels=("model",)
            ),
            GaugeMetricFamily(
                "llmesh_scheduler_workers",
                "Workers in the pool by state: ready (has room), full (at capacity), ejected (cooling "
                "down after a failure), cordoned (draining or cordoned).",
                labels=("model", "state"),
            ),
        ]

    def collect(self) -> Iterator[Metric]:
        depth, leases, workers = self._families()
        queue: dict[tuple[str, str], int] = {}
        active: dict[str, int] = {}
        states: dict[tuple[str, str], int] = {}
        with self._lock:
            pools = list(self._pools.items())
        for pool, loop in pools:
            try:
                snapshot = on_loop(loop, pool.metrics_snapshot)
            except Exception:  # a loop too busy or shutting down: this scrape goes without
                log.debug("pool not read during a scrape", exc_info=True)
                continue
            for (model, priority), n in snapshot.waiting.items():
                labels = (model, priority_label(priority))
                queue[labels] = queue.get(labels, 0) + n
            for model, n in snapshot.leases.items():
                active[model] = active.get(model, 0) + n
            for key, n in snapshot.workers.items():
                states[key] = states.get(key, 0) + n
        for (model, priority_name), n in sorted(queue.items()):
            depth.add_metric([model, priority_name], n)
        for model, n in sorted(active.items()):
            leases.add_metric([model], n)
        for (model, state), n in sorted(states.items()):
            workers.add_metric([model, state], n)
        yield from (depth, leases, workers)


POOLS = _PoolCollector()
REGISTRY.register(POOLS)
