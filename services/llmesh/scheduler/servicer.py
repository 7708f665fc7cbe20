"""SchedulerService RPCs: Acquire, Release, GetSchedulerStatus, SetRoutingPolicy, GetMetricsSummary.

GetScalingSignals is not overridden: the generated base raises NotImplementedError, which the
runtime's interceptor answers with UNIMPLEMENTED.
"""

from __future__ import annotations

import dataclasses
import uuid

from grpc import aio

from llmesh.common.errors import InvalidRequest
from llmesh.scheduler.catalog import ModelCatalog
from llmesh.scheduler.pool import WorkerPool
from llmesh.scheduler.records import Demand, Lease
from llmesh.scheduler.traffic import TrafficSummary, summary_response, window_of
from llmesh.scheduler.usage_desk import UsageDesk
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc

# Answer a bit before the caller's deadline so it gets RESOURCE_EXHAUSTED (with a retry hint)
# rather than a bare DEADLINE_EXCEEDED.
DEADLINE_MARGIN_S = 0.05


def demand_from_request(request: scheduler_pb2.AcquireRequest) -> Demand:
    """Validate an AcquireRequest into a Demand (a missing request id gets a fresh one)."""
    if not request.model:
        raise InvalidRequest("model is required: the catalog name of the model to serve the request")
    return Demand(
        request_id=request.request_id or uuid.uuid4().hex,
        model=request.model,
        prompt_tokens=request.prompt_tokens,
        max_tokens=request.max_tokens,
        tenant=request.tenant,
        priority=request.priority,
        exclude_workers=frozenset(request.exclude_workers),
    )


def lease_to_proto(lease: Lease) -> scheduler_pb2.Lease:
    """The wire form of a lease."""
    return scheduler_pb2.Lease(
        lease_id=lease.lease_id,
        worker_id=lease.worker_id,
        worker_address=lease.worker_address,
        model=lease.model,
        queued_ms=lease.queued_ms,
    )


class SchedulerServicer(scheduler_grpc.SchedulerServiceServicer):
    """Hands out leases from a `WorkerPool` (fed by the registry watch)."""

    def __init__(
        self,
        pool: WorkerPool,
        catalog: ModelCatalog,
        *,
        max_queue_wait_s: float,
        usage: UsageDesk | None = None,
        traffic: TrafficSummary | None = None,
    ) -> None:
        self._pool = pool
        self._usage = usage
        self._traffic = traffic or TrafficSummary()
        self._catalog = catalog
        self._max_queue_wait_s = max_queue_wait_s

    async def Acquire(
        self, request: scheduler_pb2.AcquireRequest, context: aio.ServicerContext
    ) -> scheduler_pb2.AcquireResponse:
        """Leases a worker for the model, queueing up to the call deadline (capped by config).

        RESOURCE_EXHAUSTED with `retry-after-ms` when every worker stayed busy; UNAVAILABLE when
        no live worker serves the model at all.
        """
        demand = demand_from_request(request)
        self._pool.check_synced()
        # Names and aliases resolve as they do for the picker ("tiny" is "tiny-llama").
        model = await self._catalog.resolve(demand.model)
        demand = dataclasses.replace(demand, model=model.name)
        wait = self._max_queue_wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, remaining - min(DEADLINE_MARGIN_S, remaining * 0.1))
        lease = await self._pool.acquire(demand, max(0.0, wait))
        return scheduler_pb2.AcquireResponse(lease=lease_to_proto(lease))

    async def Release(
        self, request: scheduler_pb2.ReleaseRequest, context: aio.ServicerContext
    ) -> scheduler_pb2.ReleaseResponse:
        """Ends a lease; `released=false` for an unknown or already-ended lease (idempotent)."""
        if not request.lease_id:
            raise InvalidRequest("lease_id is required: the id Acquire returned")
        outcome = request.outcome or scheduler_pb2.OUTCOME_SUCCESS
        if outcome == scheduler_pb2.OUTCOME_CANCELLED and self._usage is not None:
            # A worker's count for a stream its client cancelled: the picker never saw trailers.
            self._usage.worker_usage(request.lease_id, request.prompt_tokens, request.completion_tokens)
        return scheduler_pb2.ReleaseResponse(released=self._pool.release(request.lease_id, outcome))

    async def GetSchedulerStatus(
        self, request: scheduler_pb2.GetSchedulerStatusRequest, context: aio.ServicerContext
    ) -> scheduler_pb2.GetSchedulerStatusResponse:
        """Workers with their lease load, per-model queues and policies, and lease totals."""
        workers = [
            scheduler_pb2.WorkerState(
                worker_id=w.worker_id,
                address=w.address,
                models=sorted(w.models),
                active_leases=w.active,
                outstanding_tokens=w.outstanding_tokens,
                capacity=w.capacity,
                running_requests=w.running_requests,
                waiting_requests=w.waiting_requests,
                kv_cache_usage=w.kv_cache_usage,
                ejected=self._pool.is_ejected(w),
                cordoned=w.cordoned,
            )
            for w in self._pool.workers(request.model)
        ]
        queues = [
            scheduler_pb2.QueueState(model=m, waiting=waiting, active=active, policy=policy)  # type: ignore[arg-type]
            for m, waiting, active, policy in self._pool.queue_view(request.model)
        ]
        counters = self._pool.counters
        return scheduler_pb2.GetSchedulerStatusResponse(
            workers=workers,
            queues=queues,
            leases_granted=counters.leases_granted,
            leases_rejected=counters.leases_rejected,
        )

    async def SetRoutingPolicy(
        self, request: scheduler_pb2.SetRoutingPolicyRequest, context: aio.ServicerContext
    ) -> scheduler_pb2.SetRoutingPolicyResponse:
        """Sets how the model's leases are routed (LEAST_OUTSTANDING_TOKENS or ROUND_ROBIN for now)."""
        if not request.model:
            raise InvalidRequest("model is required: the model whose routing policy to set")
        policy = self._pool.set_policy(request.model, request.policy)
        return scheduler_pb2.SetRoutingPolicyResponse(policy=policy)  # type: ignore[arg-type]

    async def GetMetricsSummary(
        self, request: scheduler_pb2.GetMetricsSummaryRequest, context: aio.ServicerContext
    ) -> scheduler_pb2.GetMetricsSummaryResponse:
        """Requests and tokens per model since start, TTFT/TPOT percentiles over a recent window,
        workers by state (GET /v1/monitoring/metrics, admins only)."""
        return summary_response(self._traffic, self._pool, window_of(request.window_seconds))
