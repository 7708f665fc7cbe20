"""RegistryService RPCs: the catalog reads and worker membership.

Admin catalog writes (CreateModel, UpdateModel, DeleteModel, SetAlias, SetTrafficWeights,
ImportModels, ExportModels) are not overridden: the generated base raises NotImplementedError,
which the runtime's interceptor answers with UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator

from grpc import aio

from llmesh.common.errors import InvalidRequest, NotFound
from llmesh.registry.catalog import Catalog
from llmesh.registry.model_proto import model_to_proto
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.registry.workers import WorkerTable

# host:port (host may be a name, IPv4 or [IPv6]), or a unix: socket path.
_ADDRESS = re.compile(r"^(unix:.+|(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5}))$")
MAX_ID_LEN = 255


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


class RegistryServicer(registry_grpc.RegistryServiceServicer):
    """Serves the catalog (SQL, via `Catalog`) and live membership (memory, via `WorkerTable`)."""

    def __init__(
        self, catalog: Catalog, workers: WorkerTable, *, ttl_s: float, heartbeat_interval_s: float
    ) -> None:
        self._catalog = catalog
        self._workers = workers
        self._ttl_s = ttl_s
        self._interval_s = heartbeat_interval_s

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: aio.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        """Catalog models with their ready-worker counts; `only_ready` keeps those with one or more."""
        models = await asyncio.to_thread(self._catalog.list_models)
        counts = self._workers.ready_counts()
        out = [model_to_proto(m, counts.get(m.name, 0)) for m in models]
        if request.only_ready:
            out = [m for m in out if m.ready_workers > 0]
        return registry_pb2.ListModelsResponse(models=out)

    async def GetModel(
        self, request: registry_pb2.GetModelRequest, context: aio.ServicerContext
    ) -> registry_pb2.GetModelResponse:
        """One model by name or alias; NOT_FOUND lists the names and aliases that exist."""
        if not request.name:
            raise InvalidRequest("name is required: a model name or alias (see ListModels)")
        model = await asyncio.to_thread(self._catalog.get_model, request.name)
        if model is None:
            known = await asyncio.to_thread(self._catalog.known_names)
            raise NotFound(f"model {request.name!r} not found; known models and aliases: {known}")
        count = self._workers.ready_counts().get(model.name, 0)
        return registry_pb2.GetModelResponse(model=model_to_proto(model, count))

    async def RegisterWorker(
        self, request: registry_pb2.RegisterWorkerRequest, context: aio.ServicerContext
    ) -> registry_pb2.RegisterWorkerResponse:
        """A worker joins (or re-joins); its models must be catalog names or aliases."""
        worker = request.worker
        _require_worker_id(worker.worker_id)
        _check_address(worker.address)
        if not worker.models:
            raise InvalidRequest("worker.models is required: the catalog names of the models it serves")
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
        self._workers.register(stored)
        return registry_pb2.RegisterWorkerResponse(
            lease_ttl_seconds=math.ceil(self._ttl_s),
            heartbeat_interval_seconds=max(1, math.ceil(self._interval_s)),
        )

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: aio.ServicerContext
    ) -> registry_pb2.HeartbeatResponse:
        """Renews the worker's TTL; `known=false` tells a worker the registry forgot it (register again)."""
        _require_worker_id(request.worker_id)
        worker = self._workers.heartbeat(
            request.worker_id, request.load if request.HasField("load") else None
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
        return registry_pb2.DrainWorkerResponse(worker=worker)

    async def CordonWorker(
        self, request: registry_pb2.CordonWorkerRequest, context: aio.ServicerContext
    ) -> registry_pb2.CordonWorkerResponse:
        """Cordons (no new leases) or uncordons a worker; uncordoning also cancels a drain."""
        _require_worker_id(request.worker_id)
        status = registry_pb2.WORKER_STATUS_CORDONED if request.cordoned else registry_pb2.WORKER_STATUS_READY
        worker = self._workers.set_status(request.worker_id, status)
        return registry_pb2.CordonWorkerResponse(worker=worker)

    async def WatchWorkers(
        self, request: registry_pb2.WatchWorkersRequest, context: aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.WatchWorkersResponse]:
        """Streams SNAPSHOT events for the live workers, SNAPSHOT_END, then ADDED/UPDATED/REMOVED."""
        model = await self._model_filter(request.model)
        async for event in self._workers.watch(model):
            yield event

    async def _model_filter(self, name: str) -> str:
        """An alias in a filter means its model; an unknown name filters to nothing, not an error."""
        if not name:
            return ""
        resolved, _ = await asyncio.to_thread(self._catalog.resolve_names, [name])
        return resolved.get(name, name)
