"""RegistryService's catalog writes (admin): create, update, retire, aliases, traffic weights,
import/export, audit.

Roles are enforced at the edge by AuthService; the registry checks again, so an internal caller
that forwards a user's identity cannot write the catalog: a write needs the `x-llmesh-role`
header to be absent (trusted internal caller) or `admin`. The `x-llmesh-user` header names who
made the change in the audit table.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from llmesh.common.errors import Aborted, Forbidden, InvalidRequest, NotFound
from llmesh.registry.catalog import Catalog
from llmesh.registry.catalog_writes import parse_models_yaml
from llmesh.registry.model_proto import model_to_proto, spec_for_create, spec_for_update
from llmesh.registry.model_spec import check_name, check_version
from llmesh.registry.traffic import TrafficFeed, split_proto
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.workers import WorkerTable

ROLE_HEADER = "x-llmesh-role"
USER_HEADER = "x-llmesh-user"
ADMIN_ROLE = "admin"
MAX_AUDIT = 1000
# Retries of an update that named no etag and lost a race (with an etag the caller decides).
UNCHECKED_UPDATE_ATTEMPTS = 3


def caller(context: aio.ServicerContext) -> tuple[str, str]:
    """(role, user) from the identity headers the edge sets."""
    role = user = ""
    for key, value in context.invocation_metadata() or ():
        if key == ROLE_HEADER:
            role = str(value).strip().lower()
        elif key == USER_HEADER:
            user = str(value).strip()
    return role, user


def require_admin(context: aio.ServicerContext, action: str) -> str:
    """The actor for the audit table; Forbidden (PERMISSION_DENIED) unless the caller is an admin."""
    role, user = caller(context)
    if role and role != ADMIN_ROLE:
        raise Forbidden(
            f"{action} changes the model catalog and needs the admin role; "
            f"{user or 'this caller'} has role {role!r}"
        )
    return user or "internal"


class CatalogAdminRpcs:
    """The admin half of RegistryServicer."""

    _catalog: Catalog
    _workers: WorkerTable
    _traffic: TrafficFeed

    async def _refresh_traffic(self) -> None:
        splits = await asyncio.to_thread(self._catalog.traffic_splits)
        self._traffic.update(splits)

    def _count(self, name: str) -> int:
        return self._workers.ready_counts().get(name, 0)

    async def CreateModel(
        self, request: registry_pb2.CreateModelRequest, context: aio.ServicerContext
    ) -> registry_pb2.CreateModelResponse:
        """Adds a model version (status registered); ALREADY_EXISTS when that version exists."""
        actor = require_admin(context, "CreateModel")
        if not request.HasField("model"):
            raise InvalidRequest("model is required: the model to create (name, engine, ...)")
        # Off the loop: the first tool_parser check asks vLLM for its parser names (tool_parsers.py).
        spec = await asyncio.to_thread(spec_for_create, request.model)
        model = await asyncio.to_thread(self._catalog.create_model, spec, actor=actor)
        return registry_pb2.CreateModelResponse(model=model_to_proto(model, self._count(model.name)))

    async def UpdateModel(
        self, request: registry_pb2.UpdateModelRequest, context: aio.ServicerContext
    ) -> registry_pb2.UpdateModelResponse:
        """Changes the masked fields of one version; ABORTED when its etag moved on meanwhile."""
        actor = require_admin(context, "UpdateModel")
        name = check_name(request.model.name, "model.name")
        version = check_version(request.model.version, "model.version") if request.model.version else ""
        etag = request.etag or request.model.etag
        attempts = 1 if etag else UNCHECKED_UPDATE_ATTEMPTS
        for attempt in range(attempts):
            current = await asyncio.to_thread(self._catalog.get_model, name, version)
            if current is None:
                raise NotFound(
                    f"model.name: no model {name}{'@' + version if version else ''} (see ListModels)"
                )
            if etag and etag != current.etag:
                raise Aborted(
                    f"etag: {current.name}@{current.version} changed since etag {etag} (now {current.etag}); "
                    "read it again (GetModel), re-apply the change and retry"
                )
            spec = await asyncio.to_thread(spec_for_update, current, request.model, list(request.update_mask))
            try:
                model = await asyncio.to_thread(self._catalog.update_model, current, spec, actor=actor)
                break
            except Aborted:
                if attempt + 1 == attempts:
                    raise
        await self._refresh_traffic()
        return registry_pb2.UpdateModelResponse(model=model_to_proto(model, self._count(model.name)))

    async def DeleteModel(
        self, request: registry_pb2.DeleteModelRequest, context: aio.ServicerContext
    ) -> registry_pb2.DeleteModelResponse:
        """Retires one version, or every live version; a ready version must drain first."""
        actor = require_admin(context, "DeleteModel")
        name = check_name(request.name, "name")
        version = check_version(request.version, "version") if request.version else ""
        retired = await asyncio.to_thread(
            self._catalog.delete_model, name, version, request.etag, actor=actor
        )
        await self._refresh_traffic()
        return registry_pb2.DeleteModelResponse(models=[model_to_proto(m, 0) for m in retired])

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: aio.ServicerContext
    ) -> registry_pb2.SetAliasResponse:
        """Points an alias at a model name (an empty model removes the alias)."""
        actor = require_admin(context, "SetAlias")
        alias = check_name(request.alias, "alias")
        if request.model:
            check_name(request.model, "model")
        target = await asyncio.to_thread(self._catalog.set_alias, alias, request.model, actor=actor)
        return registry_pb2.SetAliasResponse(alias=alias, model=target)

    async def SetTrafficWeights(
        self, request: registry_pb2.SetTrafficWeightsRequest, context: aio.ServicerContext
    ) -> registry_pb2.SetTrafficWeightsResponse:
        """Splits traffic between live versions (canary, blue/green); one call also rolls back."""
        actor = require_admin(context, "SetTrafficWeights")
        name = check_name(request.name, "name")
        _, weights = await asyncio.to_thread(
            self._catalog.set_traffic_weights, name, dict(request.weights), actor=actor
        )
        await self._refresh_traffic()
        return registry_pb2.SetTrafficWeightsResponse(weights=weights)

    async def ListTrafficWeights(
        self, request: registry_pb2.ListTrafficWeightsRequest, context: aio.ServicerContext
    ) -> registry_pb2.ListTrafficWeightsResponse:
        """The splits in force, read from the catalog."""
        splits = await asyncio.to_thread(self._catalog.traffic_splits)
        if request.model:
            resolved, _ = await asyncio.to_thread(self._catalog.resolve_names, [request.model])
            name = resolved.get(request.model, request.model)
            splits = {name: splits[name]} if name in splits else {}
        return registry_pb2.ListTrafficWeightsResponse(
            splits=[split_proto(m, w) for m, w in sorted(splits.items())]
        )

    async def WatchTrafficWeights(
        self, request: registry_pb2.WatchTrafficWeightsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.WatchTrafficWeightsResponse]:
        """Streams every split (snapshot=true), then each split that changes."""
        async for event in self._traffic.watch():
            yield event

    async def ImportModels(
        self, request: registry_pb2.ImportModelsRequest, context: aio.ServicerContext
    ) -> registry_pb2.ImportModelsResponse:
        """Upserts a models YAML idempotently (unchanged rows are not written)."""
        actor = require_admin(context, "ImportModels")
        specs = await asyncio.to_thread(parse_models_yaml, request.yaml)
        result = await asyncio.to_thread(
            self._catalog.import_specs, specs, replace=request.replace, actor=actor
        )
        await self._refresh_traffic()
        return registry_pb2.ImportModelsResponse(
            imported=result.names, created=result.created, updated=result.updated, unchanged=result.unchanged
        )

    async def ExportModels(
        self, request: registry_pb2.ExportModelsRequest, context: aio.ServicerContext
    ) -> registry_pb2.ExportModelsResponse:
        """The catalog as a models YAML (the format ImportModels and --models-file read)."""
        require_admin(context, "ExportModels")
        text = await asyncio.to_thread(self._catalog.export_yaml, include_retired=request.include_retired)
        return registry_pb2.ExportModelsResponse(yaml=text)

    async def ListAuditEvents(
        self, request: registry_pb2.ListAuditEventsRequest, context: aio.ServicerContext
    ) -> registry_pb2.ListAuditEventsResponse:
        """Catalog changes, newest first."""
        require_admin(context, "ListAuditEvents")
        if request.limit > MAX_AUDIT:
            raise InvalidRequest(f"limit is {request.limit}; at most {MAX_AUDIT}")
        rows = await asyncio.to_thread(self._catalog.audit_events, request.model, request.limit or 100)
        events = []
        for r in rows:
            at = Timestamp()
            at.FromDatetime(r.at)
            events.append(
                registry_pb2.AuditEvent(
                    id=r.id,
                    at=at,
                    actor=r.actor,
                    action=r.action,
                    model=r.model,
                    version=r.version or "",
                    before_json=r.before or "",
                    after_json=r.after or "",
                )
            )
        return registry_pb2.ListAuditEventsResponse(events=events)
