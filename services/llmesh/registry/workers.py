"""Live worker membership, in memory: register, heartbeat, TTL eviction, drain/cordon, watchers.

Memory is the authority for liveness; membership changes (not heartbeats) are also written behind
to SQL (`worker_store.py`) so a restarted registry serves its last known view at once, each worker
with a fresh TTL, instead of an empty snapshot that would empty every scheduler's pool. All methods
run on the event loop thread and never await, which keeps "take a snapshot, then subscribe" atomic
for watchers.

A worker's status combines what an operator asked (cordon, drain) with what the worker reports in
its heartbeats (serving, draining, engine failed): FAILED wins, then DRAINING, then CORDONED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from llmesh.common.errors import Conflict, DependencyDown, NotFound
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


WS = registry_pb2.WorkerStatus
READY, DRAINING, CORDONED, FAILED = (
    registry_pb2.WORKER_STATUS_READY,
    registry_pb2.WORKER_STATUS_DRAINING,
    registry_pb2.WORKER_STATUS_CORDONED,
    registry_pb2.WORKER_STATUS_FAILED,
)
REPORTABLE = (READY, DRAINING, FAILED)


def effective_status(admin: int, reported: int) -> int:
    """The status schedulers see: the engine failing beats a drain, which beats a cordon."""
    if reported == FAILED:
        return FAILED
    if DRAINING in (reported, admin):
        return DRAINING
    if admin == CORDONED:
        return CORDONED
    return READY


@dataclass
class _Entry:
    worker: registry_pb2.Worker
    expires_at: float
    admin_status: int = READY
    reported_status: int = READY
    # When this registry last heard from the worker (None: loaded from the database after a restart).
    renewed_at: float | None = None


@dataclass(eq=False)  # identity hashing: watchers live in a set
class _Watcher:
    model: str
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    # Ids this watcher has been told about, so a worker that stops matching its filter is REMOVED.
    seen: set[str] = field(default_factory=set)
    overflowed: bool = False


class WorkerTable:
    """The live workers, keyed by worker id, with a lease TTL renewed by heartbeats."""

    def __init__(
        self, ttl_s: float, clock: Callable[[], float] = time.monotonic, *, conflict_window_s: float = 0.0
    ) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        # A live worker heard from within this window keeps its id against another address.
        self._conflict_window_s = conflict_window_s
        self._entries: dict[str, _Entry] = {}
        self._watchers: set[_Watcher] = set()
        # Ids whose membership changed since the last write-behind (None: removed).
        self._dirty: set[str] = set()

    def restore(self, saved: list[tuple[registry_pb2.Worker, int]]) -> None:
        """Load the last persisted membership (start-up), each worker with a fresh TTL."""
        expires = self._clock() + self._ttl_s
        for worker, admin in saved:
            # Only the combined status is stored; what the worker reported follows from it.
            reported = READY
            if worker.status == FAILED or (worker.status == DRAINING and admin != DRAINING):
                reported = worker.status
            self._entries[worker.worker_id] = _Entry(worker, expires, admin, reported, None)
        if saved:
            log.info("restored %d worker(s) from the last known membership", len(saved))

    def register(self, worker: registry_pb2.Worker) -> registry_pb2.Worker:
        """Add or replace a worker (models already resolved to catalog names); returns what is stored.

        An operator's cordon survives a re-registration; a worker may announce itself DRAINING or
        FAILED. Conflict (ALREADY_EXISTS) when another live worker, heard from within the conflict
        window, holds this id at a different address.
        """
        previous = self._entries.get(worker.worker_id)
        now_s = self._clock()
        if (
            previous is not None
            and previous.worker.address != worker.address
            and previous.renewed_at is not None
            and now_s - previous.renewed_at < self._conflict_window_s
        ):
            raise Conflict(
                f"worker id {worker.worker_id!r} is in use by a live worker at {previous.worker.address} "
                f"(heard from {now_s - previous.renewed_at:.1f}s ago); give this worker "
                f"({worker.address}) another id, or stop the other one"
            )
        stored = registry_pb2.Worker()
        stored.CopyFrom(worker)
        admin = CORDONED if previous is not None and previous.admin_status == CORDONED else READY
        reported = worker.status if worker.status in REPORTABLE else READY
        stored.status = effective_status(admin, reported)  # type: ignore[assignment]
        now = _timestamp_now()
        stored.registered_at.CopyFrom(now)
        stored.last_heartbeat.CopyFrom(now)
        self._entries[worker.worker_id] = _Entry(stored, now_s + self._ttl_s, admin, reported, now_s)
        self._dirty.add(worker.worker_id)
        log.info(
            "worker %s registered",
            worker.worker_id,
            extra={"address": stored.address, "models": list(stored.models), "rejoin": previous is not None},
        )
        self._publish(stored)
        return stored

    def heartbeat(
        self, worker_id: str, load: common_pb2.WorkerLoad | None, reported: int = 0
    ) -> registry_pb2.Worker | None:
        """Renew a worker's TTL, record its load and reported status (0 keeps it); None when unknown."""
        entry = self._entries.get(worker_id)
        if entry is None:
            return None
        now_s = self._clock()
        entry.expires_at = now_s + self._ttl_s
        entry.renewed_at = now_s
        entry.worker.last_heartbeat.CopyFrom(_timestamp_now())
        changed = False
        if reported in REPORTABLE and reported != entry.reported_status:
            entry.reported_status = reported
            changed = self._apply_status(entry)
        if load is not None and load != entry.worker.load:
            entry.worker.load.CopyFrom(load)
            changed = True
        if changed:
            self._publish(entry.worker)
        return entry.worker

    def _apply_status(self, entry: _Entry) -> bool:
        status = effective_status(entry.admin_status, entry.reported_status)
        if status == entry.worker.status:
            return False
        entry.worker.status = status  # type: ignore[assignment]
        self._dirty.add(entry.worker.worker_id)
        log.info("worker %s is now %s", entry.worker.worker_id, WS.Name(status))  # type: ignore[arg-type]
        return True

    def deregister(self, worker_id: str) -> bool:
        """Remove a worker that leaves cleanly; False when it was not known."""
        entry = self._entries.pop(worker_id, None)
        if entry is None:
            return False
        self._dirty.add(worker_id)
        log.info("worker %s deregistered", worker_id)
        self._publish_removed(entry.worker)
        return True

    def set_status(self, worker_id: str, status: int) -> registry_pb2.Worker:
        """An operator drains, cordons or uncordons (READY) a worker; NotFound names the known workers.

        The worker's own report still counts: uncordoning a worker whose engine failed leaves it FAILED.
        """
        entry = self._entries.get(worker_id)
        if entry is None:
            known = sorted(self._entries)
            shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
            raise NotFound(
                f"no live worker {worker_id!r}; live workers: [{shown}] (see ListWorkers)"
                if known
                else f"no live worker {worker_id!r}; no workers are registered"
            )
        entry.admin_status = status
        self._dirty.add(worker_id)
        if self._apply_status(entry):
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
            if e.worker.status == READY:
                for m in set(e.worker.models):
                    counts[m] = counts.get(m, 0) + 1
        return counts

    def evict_expired(self) -> list[str]:
        """Drop workers whose TTL passed without a heartbeat; returns their ids."""
        now = self._clock()
        expired = [wid for wid, e in self._entries.items() if e.expires_at <= now]
        for wid in expired:
            entry = self._entries.pop(wid)
            self._dirty.add(wid)
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

    def take_changes(self) -> tuple[list[tuple[registry_pb2.Worker, int]], list[str]]:
        """Membership changed since the last call: (workers to save with their admin status, ids
        to delete). A failed write gives them back with `changes_failed`."""
        saves, deletes = [], []
        for wid in sorted(self._dirty):
            entry = self._entries.get(wid)
            if entry is None:
                deletes.append(wid)
            else:
                saved = registry_pb2.Worker()
                saved.CopyFrom(entry.worker)
                saves.append((saved, entry.admin_status))
        self._dirty.clear()
        return saves, deletes

    def changes_failed(self, ids: list[str]) -> None:
        """Mark ids dirty again after a failed write-behind."""
        self._dirty.update(ids)

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
