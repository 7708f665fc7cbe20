"""RegistryService's StartModelInstance/StopModelInstance (admin): worker processes started and
stopped through a deployment supervisor (`llmesh up`'s), where one is attached.

Without one (plain `llmesh serve registry`, Kubernetes, where the Deployment's replicas are the
API) both answer FAILED_PRECONDITION saying what to do instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from grpc import aio

from llmesh.common.errors import FailedPrecondition, InvalidRequest, NotFound
from llmesh.registry.admin_rpcs import require_admin
from llmesh.registry.catalog import Catalog
from llmesh.registry.model_spec import check_labels
from llmesh.registry.supervisor_client import SupervisorClient
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.workers import WorkerTable

log = logging.getLogger(__name__)

# An hour: longer than any stream a worker lets finish on shutdown.
MAX_DRAIN_TIMEOUT_S = 3600


class InstanceRpcs:
    """The instance half of RegistryServicer."""

    _catalog: Catalog
    _workers: WorkerTable
    _supervisor: SupervisorClient | None
    _persisted: Callable[[], Awaitable[None]]

    def _require_supervisor(self, instead: str) -> SupervisorClient:
        if self._supervisor is None:
            raise FailedPrecondition(
                f"no supervisor attached to this registry (registry.supervisor_address is empty; llmesh up "
                f"sets it): {instead}"
            )
        return self._supervisor

    async def _catalog_model(self, name: str) -> str:
        """The catalog name of a live model or alias; NOT_FOUND names it and lists the known ones."""
        model = await asyncio.to_thread(self._catalog.get_model, name, "")
        if model is None:
            known = await asyncio.to_thread(self._catalog.known_names)
            raise NotFound(f"model: {name!r} is not a live catalog model; known models and aliases: {known}")
        return model.name

    async def StartModelInstance(
        self, request: registry_pb2.StartModelInstanceRequest, context: aio.ServicerContext
    ) -> registry_pb2.StartModelInstanceResponse:
        """Starts a worker process for the model; it joins the pool once its engine is loaded
        (watch for `worker_id`)."""
        actor = require_admin(context, "StartModelInstance")
        if not request.model:
            raise InvalidRequest("model is required: the catalog name or alias to start a worker for")
        labels = check_labels(dict(request.labels), "labels")
        supervisor = self._require_supervisor(
            "start a worker process (llmesh serve worker --registry HOST:PORT) or scale the model's "
            "Deployment on Kubernetes"
        )
        model = await self._catalog_model(request.model)
        worker_id = await supervisor.start_worker(model, labels)
        log.info("model instance starting", extra={"model": model, "worker_id": worker_id, "actor": actor})
        return registry_pb2.StartModelInstanceResponse(worker_id=worker_id)

    async def StopModelInstance(
        self, request: registry_pb2.StopModelInstanceRequest, context: aio.ServicerContext
    ) -> registry_pb2.StopModelInstanceResponse:
        """Drains one worker of the model (no new leases; running streams finish), then ends its
        process; answers at once with the worker as DRAINING."""
        actor = require_admin(context, "StopModelInstance")
        if not request.model:
            raise InvalidRequest("model is required: the catalog name or alias the worker serves")
        if not request.worker_id:
            raise InvalidRequest("worker_id is required: the worker to stop (see ListWorkers)")
        if request.drain_timeout_seconds > MAX_DRAIN_TIMEOUT_S:
            raise InvalidRequest(
                f"drain_timeout_seconds is {request.drain_timeout_seconds}; at most {MAX_DRAIN_TIMEOUT_S} "
                "(0 lets the worker's own shutdown grace decide)"
            )
        supervisor = self._require_supervisor(
            "drain the worker with DrainWorker, then stop its process (or scale the Deployment on Kubernetes)"
        )
        model = await self._catalog_model(request.model)
        live = self._workers.get(request.worker_id)
        if live is not None and model not in live.models:
            raise FailedPrecondition(
                f"worker {request.worker_id!r} serves {list(live.models)}, not {model!r}: name its model"
            )
        await supervisor.stop_worker(request.worker_id, model, request.drain_timeout_seconds)
        # Schedulers stop leasing it now; the worker itself leaves the pool as SIGTERM reaches it.
        try:
            worker = self._workers.set_status(request.worker_id, registry_pb2.WORKER_STATUS_DRAINING)
        except NotFound:  # not registered yet (still loading) or already gone
            worker = registry_pb2.Worker(
                worker_id=request.worker_id, models=[model], status=registry_pb2.WORKER_STATUS_DRAINING
            )
        await self._persisted()
        log.info(
            "model instance stopping", extra={"model": model, "worker_id": request.worker_id, "actor": actor}
        )
        return registry_pb2.StopModelInstanceResponse(worker=worker)
