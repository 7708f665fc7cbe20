"""Feeds the worker pool from RegistryService.WatchWorkers: a snapshot, then every change.

When the registry goes away the pool keeps routing to the workers it last knew; the watch
reconnects with backoff and the next complete snapshot replaces the pool's workers. Whatever goes
wrong (a gRPC error, a malformed event, a bug), the watch logs it and watches again: a scheduler
whose watch died would route on a frozen view forever.

A worker that leaves (REMOVED, or missing from a new snapshot) while it still holds leases is not
dropped: it stays in the pool, cordoned, with its lease counts, until those leases end; if it comes
back meanwhile it is routable again with its counts intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from grpc import aio

from llmesh.registry.membership import control_channel
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.scheduler.pool import WorkerPool
from llmesh.scheduler.records import WorkerSpec

log = logging.getLogger(__name__)

EventType = registry_pb2.WorkerEventType
_NOT_ROUTABLE = (
    registry_pb2.WORKER_STATUS_DRAINING,
    registry_pb2.WORKER_STATUS_CORDONED,
    registry_pb2.WORKER_STATUS_FAILED,
)
# How often workers that left while holding leases are checked for their last lease ending.
DEPARTED_SWEEP_S = 1.0


def spec_from_worker(worker: registry_pb2.Worker) -> WorkerSpec:
    """The pool's view of a registry worker."""
    return WorkerSpec(
        worker_id=worker.worker_id,
        address=worker.address,
        models=frozenset(worker.models),
        capacity=worker.capacity,
        model_versions=dict(worker.model_versions),
        cordoned=worker.status in _NOT_ROUTABLE,
        running_requests=worker.load.running_requests,
        waiting_requests=worker.load.waiting_requests,
        kv_cache_usage=worker.load.kv_cache_usage,
    )


class RegistryWatch:
    """Keeps `pool` in step with the registry's membership until `stop()`.

    `channel_or_address` is a channel (not closed here) or "host:port" (a channel owned here).
    `synced` is set once the first complete snapshot has been applied.
    """

    def __init__(
        self,
        channel_or_address: aio.Channel | str,
        pool: WorkerPool,
        *,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        if isinstance(channel_or_address, str):
            self._channel = control_channel(channel_or_address)
            self._owns_channel = True
            self._target = channel_or_address
        else:
            self._channel = channel_or_address
            self._owns_channel = False
            self._target = "registry"
        self._stub = registry_grpc.RegistryServiceStub(self._channel)
        self._pool = pool
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Workers the registry no longer lists, kept (cordoned) while their leases run.
        self._departed: set[str] = set()
        self.synced = asyncio.Event()
        self.snapshots = 0
        """Complete snapshots applied (more than 1 after reconnects)."""

    def start(self) -> None:
        """Start watching in the background."""
        self._task = asyncio.create_task(self._run(), name="registry-watch")
        self._sweeper = asyncio.create_task(self._sweep_departed(), name="registry-watch-departed")

    async def stop(self) -> None:
        """Stop watching and close an owned channel."""
        for task in (self._task, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._sweeper = None
        if self._owns_channel:
            await self._channel.close(None)

    async def _run(self) -> None:
        backoff = self._initial_backoff_s
        while True:
            snapshots_before = self.snapshots
            try:
                await self._watch_once()
                log.warning("registry %s ended the watch stream; watching again", self._target)
            except aio.AioRpcError as e:
                log.warning(
                    "watch on registry %s failed (%s: %s); keeping %d known worker(s), retrying in %.1fs",
                    self._target,
                    e.code().name,
                    e.details(),
                    len(self._pool.workers()),
                    backoff,
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "watch on registry %s broke; keeping %d known worker(s), retrying in %.1fs",
                    self._target,
                    len(self._pool.workers()),
                    backoff,
                )
            if self.snapshots > snapshots_before:
                # The stream worked before it broke (e.g. a registry restart): come back quickly.
                backoff = self._initial_backoff_s
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self._max_backoff_s)

    async def _watch_once(self) -> None:
        snapshot: list[WorkerSpec] = []
        in_snapshot = True
        stream = self._stub.WatchWorkers(registry_pb2.WatchWorkersRequest())
        try:
            async for event in stream:
                if event.type == EventType.WORKER_EVENT_TYPE_SNAPSHOT:
                    snapshot.append(spec_from_worker(event.worker))
                elif event.type == EventType.WORKER_EVENT_TYPE_SNAPSHOT_END:
                    in_snapshot = False
                    retained = self._pool.replace_workers(snapshot) or []
                    self._departed = (self._departed - {s.worker_id for s in snapshot}) | set(retained)
                    self.snapshots += 1
                    self.synced.set()
                    log.info("registry snapshot applied", extra={"workers": len(snapshot)})
                elif in_snapshot:
                    log.warning("registry sent %s before the snapshot ended; ignored", event.type)
                elif event.type in (EventType.WORKER_EVENT_TYPE_ADDED, EventType.WORKER_EVENT_TYPE_UPDATED):
                    if event.worker.status == registry_pb2.WORKER_STATUS_GONE:
                        self._depart(event.worker.worker_id)
                    else:
                        self._departed.discard(event.worker.worker_id)
                        self._pool.upsert_worker(spec_from_worker(event.worker))
                elif event.type == EventType.WORKER_EVENT_TYPE_REMOVED:
                    self._depart(event.worker.worker_id)
        finally:
            stream.cancel()

    def _depart(self, worker_id: str) -> None:
        """Remove a worker, or keep it cordoned while leases on it still run."""
        worker = next((w for w in self._pool.workers() if w.worker_id == worker_id), None)
        if worker is None:
            return
        if worker.active <= 0:
            self._departed.discard(worker_id)
            self._pool.remove_worker(worker_id)
            return
        self._departed.add(worker_id)
        self._pool.upsert_worker(
            WorkerSpec(
                worker_id=worker.worker_id,
                address=worker.address,
                models=worker.models,
                capacity=worker.capacity,
                cordoned=True,
                running_requests=worker.running_requests,
                waiting_requests=worker.waiting_requests,
                kv_cache_usage=worker.kv_cache_usage,
            )
        )
        log.info(
            "worker %s left the registry with %d lease(s) running; kept cordoned", worker_id, worker.active
        )

    def sweep_departed(self) -> list[str]:
        """Remove departed workers whose last lease ended; returns their ids."""
        if not self._departed:
            return []
        active = {w.worker_id: w.active for w in self._pool.workers()}
        done = sorted(wid for wid in self._departed if active.get(wid, 0) <= 0)
        for wid in done:
            self._departed.discard(wid)
            self._pool.remove_worker(wid)
        return done

    async def _sweep_departed(self) -> None:
        while True:
            await asyncio.sleep(DEPARTED_SWEEP_S)
            try:
                self.sweep_departed()
            except Exception:
                log.exception("sweeping departed workers failed; trying again")
