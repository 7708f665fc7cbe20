"""Write-behind persistence of worker membership, so a restarted registry serves its last view.

Only membership changes are written (join, leave, eviction, status), never heartbeats, so the
database sees a handful of writes per change, and a database outage never delays a heartbeat:
the changes stay queued in memory and are written when it is back.
"""

from __future__ import annotations

import asyncio
import logging

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmesh.registry.catalog_rows import db_call, now_utc
from llmesh.registry.schema import workers_table
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.workers import WorkerTable

log = logging.getLogger(__name__)


class WorkerStore:
    """The `registry_workers` table: one serialized Worker per id, plus the operator's status."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    @db_call
    def load(self) -> list[tuple[registry_pb2.Worker, int]]:
        """Every persisted worker with its operator status."""
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(workers_table).order_by(workers_table.c.worker_id)).all()
        out = []
        for r in rows:
            worker = registry_pb2.Worker.FromString(r.worker)
            try:
                admin = registry_pb2.WorkerStatus.Value(r.admin_status)
            except ValueError:
                admin = registry_pb2.WORKER_STATUS_READY
            out.append((worker, admin))
        return out

    @db_call
    def save(self, saves: list[tuple[registry_pb2.Worker, int]], deletes: list[str]) -> None:
        """Apply one batch of membership changes in one transaction."""
        ids = [w.worker_id for w, _ in saves] + deletes
        if not ids:
            return
        now = now_utc()
        with self._engine.begin() as conn:
            conn.execute(workers_table.delete().where(workers_table.c.worker_id.in_(ids)))
            if saves:
                conn.execute(
                    workers_table.insert(),
                    [
                        {
                            "worker_id": w.worker_id,
                            "worker": w.SerializeToString(deterministic=True),
                            "admin_status": registry_pb2.WorkerStatus.Name(admin),  # type: ignore[arg-type]
                            "updated_at": now,
                        }
                        for w, admin in saves
                    ],
                )


class MembershipWriter:
    """Writes membership changes behind the in-memory table, one batch at a time (in order).

    Joins, leaves and operator changes are flushed by their RPC before it answers (so a registry
    killed right after still knows them); a background loop catches everything else (evictions,
    status reported by heartbeats) and retries failed batches with backoff.
    """

    def __init__(self, table: WorkerTable, store: WorkerStore) -> None:
        self._table = table
        self._store = store
        self._lock = asyncio.Lock()
        self.failing = False

    async def flush(self) -> bool:
        """Write pending changes now; False (changes kept for the next try) when the database fails."""
        async with self._lock:
            saves, deletes = self._table.take_changes()
            if not saves and not deletes:
                return True
            try:
                await asyncio.to_thread(self._store.save, saves, deletes)
            except Exception as e:
                self._table.changes_failed([w.worker_id for w, _ in saves] + deletes)
                if not self.failing:
                    log.warning("cannot persist membership (%s); kept in memory, retrying", e)
                self.failing = True
                return False
        if self.failing:
            log.info("membership persisted again")
        self.failing = False
        return True

    async def run(self, period_s: float) -> None:
        """Flush every `period_s`, backing off up to 5 s while the database fails."""
        delay = period_s
        while True:
            await asyncio.sleep(delay)
            delay = period_s if await self.flush() else min(delay * 2, 5.0)
