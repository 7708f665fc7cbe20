"""Live worker membership, in memory: register, heartbeat, TTL eviction, drain/cordon, watchers.

Membership is rebuilt from heartbeats after a registry restart (workers that get `known=false`
register again), so nothing here is persisted. All methods run on the event loop thread and never
await, which keeps "take a snapshot, then subscribe" atomic for watchers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from llmesh.common.errors import DependencyDown, NotFound
from llmesh.common.v1 import common_pb2
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

log = logging.getLogger(__name__)

EventType = registry_pb2.WorkerEventType
Event = registry_pb2.WatchWorkersResponse

# A watcher that falls this many events behind is cut off; it re-watches and gets a fresh snapshot.
WATCH_QUEUE_LIMIT = 10_000


def _timestamp_now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


@dataclass
class _Entry:
    worker: registry_pb2.Worker
    expires_at: float


@dataclass(eq=False)  # identity hashing: watchers live in a set
class _Watcher:
    model: str
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    # Ids this watcher has been told about, so a worker that stops matching its filter is REMOVED.
    seen: set[str] = field(default_factory=set)
    overflowed: bool = False


class WorkerTable:
    """The live workers, keyed by worker id, with a lease TTL renewed by heartbeats."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._watchers: set[_Watcher] = set()

    def register(self, worker: registry_pb2.Worker) -> registry_pb2.Worker:
        """Add or replace a worker (models already resolved to catalog names); returns what is stored.

        An operator's cordon survives a re-registration; a worker may announce itself DRAINING.
        """
        stored = registry_pb2.Worker()
        stored.CopyFrom(worker)
        previous = self._entries.get(worker.worker_id)
        if previous is not None and previous.worker.status == registry_pb2.WORKER_STATUS_CORDONED:
            stored.status = registry_pb2.WORKER_STATUS_CORDONED
        elif worker.status != registry_pb2.WORKER_STATUS_DRAINING:
            stored.status = registry_pb2.WORKER_STATUS_READY
        now = _timestamp_now()
        stored.registered_at.CopyFrom(now)
        stored.last_heartbeat.CopyFrom(now)
        self._entries[worker.worker_id] = _Entry(stored, self._clock() + self._ttl_s)
        log.info(
            "worker %s registered",
            worker.worker_id,
            extra={"address": stored.address, "models": list(stored.models), "rejoin": previous is not None},
        )
        self._publish(stored)
        return stored

    def heartbeat(self, worker_id: str, load: common_pb2.WorkerLoad | None) -> registry_pb2.Worker | None:
        """Renew a worker's TTL and record its load; None when the worker is unknown."""
        entry = self._entries.get(worker_id)
        if entry is None:
            return None
        entry.expires_at = self._clock() + self._ttl_s
        entry.worker.last_heartbeat.CopyFrom(_timestamp_now())
        if load is not None and load != entry.worker.load:
            entry.worker.load.CopyFrom(load)
            self._publish(entry.worker)
        return entry.worker

    def deregister(self, worker_id: str) -> bool:
        """Remove a worker that leaves cleanly; False when it was not known."""
        entry = self._entries.pop(worker_id, None)
        if entry is None:
            return False
        log.info("worker %s deregistered", worker_id)
        self._publish_removed(entry.worker)
        return True

    def set_status(self, worker_id: str, status: int) -> registry_pb2.Worker:
        """Drain, cordon or uncordon (READY) a worker; NotFound names the known workers."""
        entry = self._entries.get(worker_id)
        if entry is None:
            known = sorted(self._entries)
            shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
            raise NotFound(
                f"no live worker {worker_id!r}; live workers: [{shown}] (see ListWorkers)"
                if known
                else f"no live worker {worker_id!r}; no workers are registered"
            )
        if entry.worker.status != status:
            entry.worker.status = status  # type: ignore[assignment]
            log.info(
                "worker %s is now %s",
                worker_id,
                registry_pb2.WorkerStatus.Name(status),  # type: ignore[arg-type]
            )
            self._publish(entry.worker)
        return entry.worker

    def get(self, worker_id: str) -> registry_pb2.Worker | None:
        """One live worker, or None."""
        entry = self._entries.get(worker_id)
        return entry.worker if entry else None

    def workers(self, model: str = "") -> list[registry_pb2.Worker]:
        """Live workers, by id; only those serving `model` when given."""
        return [e.worker for _, e in sorted(self._entries.items()) if not model or model in e.worker.models]

    def ready_counts(self) -> dict[str, int]:
        """Number of READY workers per model name."""
        counts: dict[str, int] = {}
        for e in self._entries.values():
            if e.worker.status == registry_pb2.WORKER_STATUS_READY:
                for m in set(e.worker.models):
                    counts[m] = counts.get(m, 0) + 1
        return counts

    def evict_expired(self) -> list[str]:
        """Drop workers whose TTL passed without a heartbeat; returns their ids."""
        now = self._clock()
        expired = [wid for wid, e in self._entries.items() if e.expires_at <= now]
        for wid in expired:
            entry = self._entries.pop(wid)
            log.warning("worker %s evicted: no heartbeat within %.1fs", wid, self._ttl_s)
            self._publish_removed(entry.worker)
        return expired

    async def watch(self, model: str = "") -> AsyncIterator[Event]:
        """Snapshot events, SNAPSHOT_END, then live changes, until `close_watchers` or overflow."""
        watcher = _Watcher(model)
        # No await between the snapshot and the subscription: no change can slip between them.
        snapshot = [Event(type=EventType.WORKER_EVENT_TYPE_SNAPSHOT, worker=w) for w in self.workers(model)]
        watcher.seen.update(e.worker.worker_id for e in snapshot)
        self._watchers.add(watcher)
        try:
            for event in snapshot:
                yield event
            yield Event(type=EventType.WORKER_EVENT_TYPE_SNAPSHOT_END)
            while True:
                change = await watcher.queue.get()
                if change is None:
                    if watcher.overflowed:
                        raise DependencyDown(
                            f"watch fell more than {WATCH_QUEUE_LIMIT} events behind; "
                            "watch again for a fresh snapshot"
                        )
                    return
                yield change
        finally:
            self._watchers.discard(watcher)

    def close_watchers(self) -> None:
        """End every watch stream (registry shutting down)."""
        for w in list(self._watchers):
            w.queue.put_nowait(None)

    @property
    def watcher_count(self) -> int:
        """Open watch streams."""
        return len(self._watchers)

    def _publish(self, worker: registry_pb2.Worker) -> None:
        # Events are built per watcher: the constructor copies `worker`, which keeps changing.
        for w in list(self._watchers):
            if not w.model or w.model in worker.models:
                kind = EventType.WORKER_EVENT_TYPE_UPDATED if worker.worker_id in w.seen else None
                w.seen.add(worker.worker_id)
                self._send(w, Event(type=kind or EventType.WORKER_EVENT_TYPE_ADDED, worker=worker))
            elif worker.worker_id in w.seen:
                w.seen.discard(worker.worker_id)
                self._send(w, Event(type=EventType.WORKER_EVENT_TYPE_REMOVED, worker=_gone(worker)))

    def _publish_removed(self, worker: registry_pb2.Worker) -> None:
        for w in list(self._watchers):
            if worker.worker_id in w.seen:
                w.seen.discard(worker.worker_id)
                self._send(w, Event(type=EventType.WORKER_EVENT_TYPE_REMOVED, worker=_gone(worker)))

    @staticmethod
    def _send(watcher: _Watcher, event: Event) -> None:
        if watcher.overflowed:
            return
        if watcher.queue.qsize() >= WATCH_QUEUE_LIMIT:
            watcher.overflowed = True
            watcher.queue.put_nowait(None)
            return
        watcher.queue.put_nowait(event)


def _gone(worker: registry_pb2.Worker) -> registry_pb2.Worker:
    gone = registry_pb2.Worker()
    gone.CopyFrom(worker)
    gone.status = registry_pb2.WORKER_STATUS_GONE
    return gone
