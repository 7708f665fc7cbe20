"""The in-memory worker pool: which workers can take work, the leases they hold, who waits.

Counting in-flight work from our own leases (not from worker heartbeats, which lag) lets the pool
know each worker's load the instant a lease is granted or released. Everything runs on the event
loop thread; no method awaits while it changes state, so no locks are needed.

Two failures look alike to a caller but mean different things, and get different errors:
- OverCapacity (RESOURCE_EXHAUSTED, retry-after): workers serve the model but are all busy, and
  none freed up within the wait (or the queue is full). Retrying later will likely succeed.
- DependencyDown (UNAVAILABLE): no live worker serves the model at all (none registered, all
  cordoned/draining, or all excluded by the caller). Waiting in a queue would not help.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

from llmesh.common.errors import DependencyDown, OverCapacity
from llmesh.scheduler import metrics
from llmesh.scheduler.policy import DEFAULT_POLICY, Policy, make_policy
from llmesh.scheduler.records import DEFAULT_CAPACITY, Demand, Lease, PoolWorker, WorkerSpec
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2

log = logging.getLogger(__name__)


@dataclass
class _Waiter:
    demand: Demand
    future: asyncio.Future[Lease]
    enqueued_at: float
    # Acquires with the same request id share one place in the queue.
    callers: int = 1


@dataclass
class PoolCounters:
    """Totals since start."""

    leases_granted: int = 0
    leases_rejected: int = 0
    leases_reclaimed: int = 0


@dataclass
class _ModelState:
    queue: deque[_Waiter] = field(default_factory=deque)
    policy_kind: int = DEFAULT_POLICY
    policy: Policy = field(default_factory=lambda: make_policy(DEFAULT_POLICY))
    # Exponential moving average of how long leases are held, for retry hints.
    hold_s: float = 1.0


class WorkerPool:
    """Workers, leases and per-model FIFO queues; fed by membership, used by the servicer."""

    def __init__(
        self,
        *,
        max_queue_depth: int = 256,
        lease_timeout_s: float = 900.0,
        eject_s: float = 10.0,
        default_capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
        traffic: Callable[[str], Mapping[str, int]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._max_queue_depth = max_queue_depth
        self._lease_timeout_s = lease_timeout_s
        self._eject_s = eject_s
        self._default_capacity = default_capacity
        self._clock = clock
        # The registry's traffic split of a model ({version: weight}, {} for none) and the dice.
        self._traffic = traffic
        self._rng = rng or random.Random()
        self._workers: dict[str, PoolWorker] = {}
        self._leases: dict[str, Lease] = {}
        self._lease_by_request: dict[str, str] = {}
        self._waiter_by_request: dict[str, _Waiter] = {}
        self._models: dict[str, _ModelState] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self.counters = PoolCounters()
        self.synced = False
        """True once a full worker list arrived (before that, Acquire answers UNAVAILABLE)."""

    # ---- membership -------------------------------------------------------------------------

    def upsert_worker(self, spec: WorkerSpec) -> None:
        """Add a worker or update its membership facts (its leases and ejection are kept)."""
        worker = self._workers.get(spec.worker_id)
        if worker is None:
            worker = PoolWorker(spec.worker_id, spec.address, spec.models, 0)
            self._workers[spec.worker_id] = worker
            log.info("worker %s joined the pool", spec.worker_id, extra={"models": sorted(spec.models)})
        worker.address = spec.address
        worker.models = spec.models
        worker.capacity = spec.capacity or self._default_capacity
        worker.model_versions = dict(spec.model_versions)
        worker.cordoned = spec.cordoned
        worker.running_requests = spec.running_requests
        worker.waiting_requests = spec.waiting_requests
        worker.kv_cache_usage = spec.kv_cache_usage
        self._dispatch(spec.models)

    def remove_worker(self, worker_id: str) -> bool:
        """Drop a worker from routing; its leases end as failed (releasing them later is a no-op)."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return False
        dropped = [lid for lid, lease in self._leases.items() if lease.worker_id == worker_id]
        for lid in dropped:
            self._forget(self._leases.pop(lid))
        log.info("worker %s left the pool", worker_id, extra={"leases_dropped": len(dropped)})
        # Waiters that only this worker could serve now fail fast instead of timing out.
        self._dispatch(worker.models)
        return True

    def replace_workers(self, specs: Iterable[WorkerSpec]) -> list[str]:
        """Make the pool `specs` (a fresh registry snapshot) and mark it synced.

        A worker the snapshot lacks but that still holds leases is kept, cordoned, with its lease
        counts: its streams are still running (a registry that restarted may not know it yet).
        Returns the ids kept that way; the caller removes them once their leases end.
        """
        specs = list(specs)
        keep = {s.worker_id for s in specs}
        retained = []
        for wid, worker in list(self._workers.items()):
            if wid in keep:
                continue
            if worker.active > 0:
                worker.cordoned = True
                retained.append(wid)
            else:
                self.remove_worker(wid)
        for spec in specs:
            self.upsert_worker(spec)
        self.synced = True
        if retained:
            log.warning(
                "registry snapshot lacks %d worker(s) that still hold leases; kept cordoned until they end",
                len(retained),
                extra={"workers": retained},
            )
        return retained

    # ---- leases -----------------------------------------------------------------------------

    async def acquire(self, demand: Demand, timeout_s: float) -> Lease:
        """A lease on the best worker for `demand`, waiting up to `timeout_s` for capacity.

        Raises DependencyDown when no live worker serves the model (nothing to wait for), and
        OverCapacity (with retry_after_s) when the queue is full or the wait ran out. Acquiring
        again with the request id of a live lease returns that lease.
        """
        self.check_synced()
        lease = self._leases.get(self._lease_by_request.get(demand.request_id, ""))
        if lease is not None and lease.worker_id not in demand.exclude_workers:
            return lease
        waiter = self._waiter_by_request.get(demand.request_id)
        if waiter is not None:
            waiter.callers += 1
            return await self._wait(waiter, timeout_s)
        self._check_served(demand)
        demand = self._with_version(demand)
        lease = self._try_grant(demand, queued_ms=0)
        if lease is not None:
            return lease
        state = self._state(demand.model)
        if len(state.queue) >= self._max_queue_depth:
            raise self._reject(demand, f"queue full ({len(state.queue)} waiting)", outcome="queue_full")
        if timeout_s <= 0:
            raise self._reject(demand, "no time left to wait")
        waiter = _Waiter(demand, asyncio.get_running_loop().create_future(), self._clock())
        state.queue.append(waiter)
        self._waiter_by_request[demand.request_id] = waiter
        return await self._wait(waiter, timeout_s)

    def release(self, lease_id: str, outcome: int = scheduler_pb2.OUTCOME_SUCCESS) -> bool:
        """End a lease; False when it is unknown (already released, reclaimed or its worker left).

        OUTCOME_WORKER_FAILED ejects the worker from new leases for `eject_s`.
        """
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        metrics.LEASE_RELEASES.labels(lease.model, metrics.outcome_label(outcome)).inc()
        self._forget(lease)
        state = self._state(lease.model)
        state.hold_s = 0.8 * state.hold_s + 0.2 * max(0.0, self._clock() - lease.acquired_at)
        worker = self._workers.get(lease.worker_id)
        if worker is not None and outcome == scheduler_pb2.OUTCOME_WORKER_FAILED:
            self._eject(worker)
        self._dispatch(worker.models if worker else [lease.model])
        return True

    def _with_version(self, demand: Demand) -> Demand:
        """Under a traffic split (canary, blue/green) the request runs on one version, drawn by
        the split's weights among the versions that have a live worker; without a split, or with
        no live worker of any version in it, on any worker of the model."""
        if demand.version or self._traffic is None:
            return demand
        weights = self._traffic(demand.model)
        if not weights:
            return demand
        live = {
            w.model_versions.get(demand.model, "")
            for w in self._workers.values()
            if demand.model in w.models and not w.cordoned
        }
        choices = [
            (version, weight) for version, weight in sorted(weights.items()) if weight > 0 and version in live
        ]
        if not choices:
            return demand
        version = self._rng.choices([v for v, _ in choices], weights=[w for _, w in choices])[0]
        return dataclasses.replace(demand, version=version)

    def fallbacks(self, lease: Lease, limit: int) -> list[str]:
        """Addresses of other workers that could take the lease's request now, best first: where
        Envoy retries when the leased worker fails before its first byte (no lease is taken)."""
        now = self._clock()
        others = [
            w
            for w in self._workers.values()
            if lease.model in w.models
            and w.worker_id != lease.worker_id
            and not w.cordoned
            and w.ejected_until <= now
        ]
        others.sort(key=lambda w: (w.active >= w.capacity, w.outstanding_tokens, w.active, w.worker_id))
        return [w.address for w in others[:limit]]

    def reclaim_expired(self) -> int:
        """Release leases held past `lease_timeout_s` (a caller that crashed); returns how many."""
        deadline = self._clock() - self._lease_timeout_s
        stale = [lid for lid, lease in self._leases.items() if lease.acquired_at <= deadline]
        for lid in stale:
            log.warning("lease %s not released within %.0fs; reclaimed", lid, self._lease_timeout_s)
            self.release(lid, scheduler_pb2.OUTCOME_CANCELLED)
        self.counters.leases_reclaimed += len(stale)
        return len(stale)

    def set_policy(self, model: str, kind: int) -> int:
        """Route `model` with policy `kind` from now on; returns the policy in force."""
        state = self._state(model)
        if kind != state.policy_kind:
            state.policy, state.policy_kind = make_policy(kind), kind
        return state.policy_kind

    def close(self) -> None:
        """Cancel timers and fail every waiter (shutting down)."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for state in self._models.values():
            while state.queue:
                waiter = state.queue.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(DependencyDown("the scheduler is shutting down; retry"))

    # ---- introspection ----------------------------------------------------------------------

    def check_synced(self) -> None:
        """DependencyDown until the first full worker list arrived from the registry."""
        if not self.synced:
            raise DependencyDown(
                "the scheduler has not received the worker list from the registry yet; retry"
            )

    def serves(self, model: str) -> bool:
        """Whether some live (not cordoned) worker serves `model` under exactly that name."""
        return any(model in w.models and not w.cordoned for w in self._workers.values())

    def workers(self, model: str = "") -> list[PoolWorker]:
        """Workers by id; only those serving `model` when given."""
        return [w for _, w in sorted(self._workers.items()) if not model or model in w.models]

    def is_ejected(self, worker: PoolWorker) -> bool:
        """Whether the worker is in its post-failure cool-down."""
        return worker.ejected_until > self._clock()

    def worker_state(self, worker: PoolWorker) -> str:
        """cordoned, ejected (cooling down after a failure), full (at capacity) or ready."""
        if worker.cordoned:
            return "cordoned"
        if self.is_ejected(worker):
            return "ejected"
        return "full" if worker.active >= worker.capacity else "ready"

    def metrics_snapshot(self) -> metrics.PoolSnapshot:
        """Waiting requests by (model, priority), leases by model, workers by (model, state), for
        the metrics collector (which calls it on the event loop)."""
        snap = metrics.PoolSnapshot()
        workers = list(self._workers.values())
        for model in {m for w in workers for m in w.models}:
            snap.waiting[(model, scheduler_pb2.PRIORITY_NORMAL)] = 0  # an idle model reads 0, not absent
        for model, state in list(self._models.items()):
            for waiter in list(state.queue):
                key = (model, waiter.demand.priority)
                snap.waiting[key] = snap.waiting.get(key, 0) + 1
        for lease in list(self._leases.values()):
            snap.leases[lease.model] = snap.leases.get(lease.model, 0) + 1
        for w in workers:
            state_name = self.worker_state(w)
            for model in w.models:
                snap.workers[(model, state_name)] = snap.workers.get((model, state_name), 0) + 1
        return snap

    def queue_view(self, model: str = "") -> list[tuple[str, int, int, int]]:
        """(model, waiting, active leases, policy) for every model the pool has seen."""
        models = {m for w in self._workers.values() for m in w.models} | set(self._models)
        active: dict[str, int] = {}
        for lease in self._leases.values():
            active[lease.model] = active.get(lease.model, 0) + 1
        out = []
        for m in sorted(models):
            if model and m != model:
                continue
            state = self._models.get(m)
            waiting = len(state.queue) if state else 0
            out.append((m, waiting, active.get(m, 0), state.policy_kind if state else DEFAULT_POLICY))
        return out

    # ---- internals --------------------------------------------------------------------------

    def _state(self, model: str) -> _ModelState:
        return self._models.setdefault(model, _ModelState())

    def _check_served(self, demand: Demand) -> None:
        live_ids = {
            w.worker_id for w in self._workers.values() if demand.model in w.models and not w.cordoned
        }
        if live_ids <= demand.exclude_workers:
            raise self._unserved_error(demand)

    def _unserved_error(self, demand: Demand) -> DependencyDown:
        metrics.LEASE_DECISIONS.labels(demand.model, "no_worker").inc()
        serving = [w for w in self._workers.values() if demand.model in w.models]
        if any(not w.cordoned for w in serving):
            return DependencyDown(
                f"no live worker serves model {demand.model!r} besides the excluded "
                f"{sorted(demand.exclude_workers)}; retry later"
            )
        why = f" ({len(serving)} cordoned or draining)" if serving else ""
        others = sorted({m for w in self._workers.values() if not w.cordoned for m in w.models})
        return DependencyDown(
            f"no live worker serves model {demand.model!r}{why}; models with live workers: {others}"
        )

    def _try_grant(self, demand: Demand, queued_ms: int) -> Lease | None:
        now = self._clock()
        candidates = [
            w
            for w in self._workers.values()
            if demand.model in w.models
            and not w.cordoned
            and w.ejected_until <= now
            and w.worker_id not in demand.exclude_workers
            and w.active < w.capacity
            and (not demand.version or w.model_versions.get(demand.model, "") == demand.version)
        ]
        if not candidates:
            return None
        worker = cast(PoolWorker, self._state(demand.model).policy.choose(demand.model, candidates))
        lease = Lease(
            lease_id=uuid.uuid4().hex,
            worker_id=worker.worker_id,
            worker_address=worker.address,
            model=demand.model,
            request_id=demand.request_id,
            tokens=demand.tokens,
            acquired_at=now,
            queued_ms=queued_ms,
        )
        worker.active += 1
        worker.outstanding_tokens += lease.tokens
        self._leases[lease.lease_id] = lease
        self._lease_by_request[demand.request_id] = lease.lease_id
        self.counters.leases_granted += 1
        metrics.LEASE_DECISIONS.labels(demand.model, "granted").inc()
        metrics.QUEUE_WAIT.labels(demand.model, metrics.priority_label(demand.priority)).observe(
            queued_ms / 1000
        )
        return lease

    def _forget(self, lease: Lease) -> None:
        """Undo a lease's bookkeeping (the caller already removed it from `_leases`)."""
        if self._lease_by_request.get(lease.request_id) == lease.lease_id:
            del self._lease_by_request[lease.request_id]
        worker = self._workers.get(lease.worker_id)
        if worker is not None:
            worker.active -= 1
            worker.outstanding_tokens -= lease.tokens

    def _eject(self, worker: PoolWorker) -> None:
        worker.ejected_until = self._clock() + self._eject_s
        log.warning("worker %s ejected for %.1fs after a failure", worker.worker_id, self._eject_s)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no running loop: nobody can be waiting
            return
        models = worker.models

        def end_ejection() -> None:
            self._timers.discard(timer)
            self._dispatch(models)

        timer = loop.call_later(self._eject_s, end_ejection)
        self._timers.add(timer)

    def _dispatch(self, models: Iterable[str]) -> None:
        """Hand freed capacity to waiters, first come first served among those it can serve, and
        fail the waiters no live worker can serve any more (membership changed under them)."""
        for model in models:
            state = self._models.get(model)
            if state is None or not state.queue:
                continue
            live = [w for w in self._workers.values() if model in w.models and not w.cordoned]
            live_ids = {w.worker_id for w in live}
            now = self._clock()
            has_room = any(w.active < w.capacity and w.ejected_until <= now for w in live)
            for waiter in list(state.queue):
                if waiter.future.done():
                    self._unqueue(waiter)
                elif live_ids <= waiter.demand.exclude_workers:  # also true when nothing is live
                    self._unqueue(waiter)
                    waiter.future.set_exception(self._unserved_error(waiter.demand))
                elif has_room:
                    waited_ms = math.ceil((now - waiter.enqueued_at) * 1000)
                    lease = self._try_grant(waiter.demand, queued_ms=waited_ms)
                    if lease is not None:
                        self._unqueue(waiter)
                        waiter.future.set_result(lease)
                        has_room = any(w.active < w.capacity and w.ejected_until <= now for w in live)

    def _unqueue(self, waiter: _Waiter) -> None:
        state = self._models.get(waiter.demand.model)
        if state is not None and waiter in state.queue:
            state.queue.remove(waiter)
        if self._waiter_by_request.get(waiter.demand.request_id) is waiter:
            del self._waiter_by_request[waiter.demand.request_id]

    async def _wait(self, waiter: _Waiter, timeout_s: float) -> Lease:
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout_s)
        except TimeoutError:
            if waiter.future.done():  # granted (or failed) right at the deadline
                return waiter.future.result()
            self._leave(waiter)
            raise self._reject(waiter.demand, f"waited {timeout_s:.1f}s") from None
        except asyncio.CancelledError:
            self._leave(waiter)
            raise

    def _leave(self, waiter: _Waiter) -> None:
        """One caller stopped waiting; the last one out gives up the place (and any late grant)."""
        waiter.callers -= 1
        if waiter.callers > 0:
            return
        self._unqueue(waiter)
        if not waiter.future.done():
            waiter.future.cancel()
        elif not waiter.future.cancelled() and waiter.future.exception() is None:
            self.release(waiter.future.result().lease_id, scheduler_pb2.OUTCOME_CANCELLED)

    def _reject(self, demand: Demand, why: str, outcome: str = "wait_timeout") -> OverCapacity:
        self.counters.leases_rejected += 1
        metrics.LEASE_DECISIONS.labels(demand.model, outcome).inc()
        state = self._state(demand.model)
        serving = [w for w in self._workers.values() if demand.model in w.models and not w.cordoned]
        capacity = sum(w.capacity for w in serving) or 1
        ejected = sum(1 for w in serving if self.is_ejected(w))
        retry_after = min(30.0, max(0.1, state.hold_s * (len(state.queue) + 1) / capacity))
        detail = f" ({ejected} ejected after failures)" if ejected else ""
        return OverCapacity(
            f"no capacity for model {demand.model!r}: {len(serving)} worker(s) busy{detail}, {why}; "
            f"retry in about {retry_after:.1f}s",
            retry_after_s=retry_after,
        )
