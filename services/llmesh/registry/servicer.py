"""RegistryService RPCs: catalog reads, worker membership and its watch.

The admin catalog writes come from `CatalogAdminRpcs` (admin_rpcs.py), Start/StopModelInstance
from `InstanceRpcs` (instance_rpcs.py). Membership never depends on
the database being up: liveness is in memory, persistence is written behind, and model names
resolve from the last known catalog during an outage, so a database error is UNAVAILABLE at worst.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable

from grpc import aio

from llmesh.common.errors import DependencyDown, InvalidRequest, NotFound
from llmesh.registry.admin_rpcs import CatalogAdminRpcs
from llmesh.registry.catalog import Catalog
from llmesh.registry.instance_rpcs import InstanceRpcs
from llmesh.registry.model_proto import model_to_proto
from llmesh.registry.supervisor_client import SupervisorClient
from llmesh.registry.traffic import TrafficFeed
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.registry.workers import WorkerTable

# host:port (host may be a name, IPv4 or [IPv6]), or a unix: socket path.
_ADDRESS = re.compile(r"^(unix:.+|(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5}))$")
MAX_ID_LEN = 255
# How long a membership RPC waits for its change to reach the database before answering anyway.
PERSIST_WAIT_S = 1.0


def _require_worker_id(worker_id: str) -> None:
    if not worker_id:
        raise InvalidRequest("worker_id is required (the worker's stable id, e.g. 'worker-0')")
    if len(worker_id) > MAX_ID_LEN:
        raise InvalidRequest(f"worker_id is {len(worker_id)} characters; at most {MAX_ID_LEN} allowed")


def _check_address(address: str) -> None:
    if not address:
        raise InvalidRequest("worker.address is required: the host:port other services dial")
    match = _ADDRESS.match(address)
    if match is None or (match.group(3) is not None and not 0 < int(match.group(3)) < 65536):
        raise InvalidRequest(
            f"worker.address {address!r} is not host:port (e.g. '10.0.0.5:50060') or unix:PATH"
        )


_REPORTABLE = (
    registry_pb2.WORKER_STATUS_UNSPECIFIED,
    registry_pb2.WORKER_STATUS_READY,
    registry_pb2.WORKER_STATUS_DRAINING,
    registry_pb2.WORKER_STATUS_FAILED,
)


class RegistryServicer(CatalogAdminRpcs, InstanceRpcs, registry_grpc.RegistryServiceServicer):
    """Serves the catalog (SQL, via `Catalog`) and live membership (memory, via `WorkerTable`)."""

    def __init__(
        self,
        catalog: Catalog,
        workers: WorkerTable,
        *,
        ttl_s: float,
        heartbeat_interval_s: float,
        traffic: TrafficFeed | None = None,
        persist: Callable[[], Awaitable[bool]] | None = None,
        supervisor: SupervisorClient | None = None,
    ) -> None:
        self._catalog = catalog
        self._workers = workers
        self._ttl_s = ttl_s
        self._interval_s = heartbeat_interval_s
        self._traffic = traffic or TrafficFeed()
        self._persist = persist
        self._supervisor = supervisor

    async def _persisted(self) -> None:
        # Best effort, bounded: a database that is down (or hangs) leaves the change queued for the
        # write-behind loop and never fails or stalls the RPC.
        if self._persist is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._persist()), PERSIST_WAIT_S)

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: aio.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        """Catalog models with their ready-worker counts; `only_ready` keeps those with one or more."""
        models = await asyncio.to_thread(self._catalog.list_models, include_retired=request.include_retired)
        counts = self._workers.ready_counts()
        out = [model_to_proto(m, counts.get(m.name, 0)) for m in models]
        if request.only_ready:
            out = [m for m in out if m.ready_workers > 0]
        return registry_pb2.ListModelsResponse(models=out)

    async def GetModel(
        self, request: registry_pb2.GetModelRequest, context: aio.ServicerContext
    ) -> registry_pb2.GetModelResponse:
        """One model by name or alias (a version, or the newest live one); NOT_FOUND lists the names."""
        if not request.name:
            raise InvalidRequest("name is required: a model name or alias (see ListModels)")
        model = await asyncio.to_thread(self._catalog.get_model, request.name, request.version)
        if model is None:
            known = await asyncio.to_thread(self._catalog.known_names)
            at = f" at version {request.version!r}" if request.version else ""
            raise NotFound(f"model {request.name!r}{at} not found; known models and aliases: {known}")
        count = self._workers.ready_counts().get(model.name, 0)
        return registry_pb2.GetModelResponse(model=model_to_proto(model, count))

    async def RegisterWorker(
        self, request: registry_pb2.RegisterWorkerRequest, context: aio.ServicerContext
    ) -> registry_pb2.RegisterWorkerResponse:
        """A worker joins (or re-joins); its models must be catalog names or aliases.

        ALREADY_EXISTS when another live worker holds the id at another address; UNAVAILABLE
        (retry) when the catalog database is down and no catalog was read yet.
        """
        worker = request.worker
        _require_worker_id(worker.worker_id)
        _check_address(worker.address)
        if not worker.models:
            raise InvalidRequest("worker.models is required: the catalog names of the models it serves")
        if worker.status not in _REPORTABLE:
            raise InvalidRequest("worker.status: a worker reports READY, DRAINING or FAILED")
        resolved, unknown = await asyncio.to_thread(self._catalog.resolve_names, worker.models)
        if unknown:
            known = await asyncio.to_thread(self._catalog.known_names)
            raise InvalidRequest(
                f"worker {worker.worker_id!r} serves model(s) the catalog does not know: {unknown}; "
                f"known models and aliases: {known} (add them to the config's models)"
            )
        stored = registry_pb2.Worker()
        stored.CopyFrom(worker)
        del stored.models[:]
        stored.models.extend(dict.fromkeys(resolved[m] for m in worker.models))
        stored.model_versions.clear()
        stored.model_versions.update(await self._check_versions(worker, resolved))
        self._workers.register(stored)
        await self._persisted()
        return registry_pb2.RegisterWorkerResponse(
            lease_ttl_seconds=math.ceil(self._ttl_s),
            heartbeat_interval_seconds=max(1, math.ceil(self._interval_s)),
        )

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: aio.ServicerContext
    ) -> registry_pb2.HeartbeatResponse:
        """Renews the worker's TTL; `known=false` tells a worker the registry forgot it (register again)."""
        _require_worker_id(request.worker_id)
        if request.status not in _REPORTABLE:
            raise InvalidRequest("status: a worker reports READY, DRAINING or FAILED (or leaves it unset)")
        worker = self._workers.heartbeat(
            request.worker_id, request.load if request.HasField("load") else None, request.status
        )
        if worker is None:
            return registry_pb2.HeartbeatResponse(known=False)
        return registry_pb2.HeartbeatResponse(known=True, status=worker.status)

    async def DeregisterWorker(
        self, request: registry_pb2.DeregisterWorkerRequest, context: aio.ServicerContext
    ) -> registry_pb2.DeregisterWorkerResponse:
        """A worker leaves; idempotent (an unknown id is not an error)."""
        _require_worker_id(request.worker_id)
        self._workers.deregister(request.worker_id)
        await self._persisted()
        return registry_pb2.DeregisterWorkerResponse()

    async def ListWorkers(
        self, request: registry_pb2.ListWorkersRequest, context: aio.ServicerContext
    ) -> registry_pb2.ListWorkersResponse:
        """Live workers, optionally only those serving a model (name or alias)."""
        model = await self._model_filter(request.model)
        return registry_pb2.ListWorkersResponse(workers=self._workers.workers(model))

    async def DrainWorker(
        self, request: registry_pb2.DrainWorkerRequest, context: aio.ServicerContext
    ) -> registry_pb2.DrainWorkerResponse:
        """Marks a worker DRAINING: schedulers stop leasing it; its heartbeat answer tells it so."""
        _require_worker_id(request.worker_id)
        worker = self._workers.set_status(request.worker_id, registry_pb2.WORKER_STATUS_DRAINING)
        await self._persisted()
        return registry_pb2.DrainWorkerResponse(worker=worker)

    async def CordonWorker(
        self, request: registry_pb2.CordonWorkerRequest, context: aio.ServicerContext
    ) -> registry_pb2.CordonWorkerResponse:
        """Cordons (no new leases) or uncordons a worker; uncordoning also cancels a drain."""
        _require_worker_id(request.worker_id)
        status = registry_pb2.WORKER_STATUS_CORDONED if request.cordoned else registry_pb2.WORKER_STATUS_READY
        worker = self._workers.set_status(request.worker_id, status)
        await self._persisted()
        return registry_pb2.CordonWorkerResponse(worker=worker)

    async def WatchWorkers(
        self, request: registry_pb2.WatchWorkersRequest, context: aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.WatchWorkersResponse]:
        """Streams SNAPSHOT events for the live workers, SNAPSHOT_END, then ADDED/UPDATED/REMOVED."""
        model = await self._model_filter(request.model)
        async for event in self._workers.watch(model):
            yield event

    async def _check_versions(self, worker: registry_pb2.Worker, resolved: dict[str, str]) -> dict[str, str]:
        """The worker's model -> version map keyed by model name; each version must be live."""
        if not worker.model_versions:
            return {}
        out: dict[str, str] = {}
        for key, version in sorted(worker.model_versions.items()):
            if key not in resolved:
                raise InvalidRequest(
                    f"worker.model_versions[{key!r}]: {key!r} is not one of worker.models {list(worker.models)}"
                )
            out[resolved[key]] = version
        try:
            models = await asyncio.to_thread(self._catalog.list_models)
        except DependencyDown:
            return out  # the database is down: trust the worker rather than refuse it
        live = {(m.name, m.version) for m in models}
        for name, version in out.items():
            if (name, version) not in live:
                versions = sorted(v for n, v in live if n == name)
                raise InvalidRequest(
                    f"worker.model_versions[{name!r}]: {name!r} has no live version {version!r}; "
                    f"live versions: {versions}"
                )
        return out

    async def _model_filter(self, name: str) -> str:
        """An alias in a filter means its model; an unknown name filters to nothing, not an error."""
        if not name:
            return ""
        resolved, _ = await asyncio.to_thread(self._catalog.resolve_names, [name])
        return resolved.get(name, name)
