"""Catalog rows to `registry.v1.Model` messages."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from llmesh.registry.catalog import CatalogModel
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

# Statuses that turn READY on reads while a ready worker serves the model.
_SHOWN_READY_WHEN_SERVED = (registry_pb2.MODEL_STATUS_REGISTERED, registry_pb2.MODEL_STATUS_DEPLOYING)


def _known_fields(message_cls: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Only the keys the message has (the catalog may hold settings v1 does not carry)."""
    names = {f.name for f in message_cls.DESCRIPTOR.fields}
    return {k: v for k, v in values.items() if k in names and v is not None}


def model_to_proto(model: CatalogModel, ready_workers: int) -> registry_pb2.Model:
    """The wire form of a catalog model; `ready_workers` comes from live membership."""
    created = Timestamp()
    created.FromDatetime(model.created_at)
    status = model.status
    if ready_workers > 0 and status in _SHOWN_READY_WHEN_SERVED:
        status = registry_pb2.MODEL_STATUS_READY
    return registry_pb2.Model(
        name=model.name,
        version=model.version,
        aliases=list(model.aliases),
        description=model.description,
        owned_by=model.owned_by,
        engine=registry_pb2.EngineSettings(**_known_fields(registry_pb2.EngineSettings, model.engine)),
        limits=registry_pb2.ModelLimits(**_known_fields(registry_pb2.ModelLimits, model.limits)),
        templates=[
            registry_pb2.ScenarioTemplate(**_known_fields(registry_pb2.ScenarioTemplate, t))
            for t in model.templates
        ],
        cost_per_1k_tokens=model.cost_per_1k_tokens,
        status=status,  # type: ignore[arg-type]
        deploy=registry_pb2.DeploySettings(**_known_fields(registry_pb2.DeploySettings, model.deploy)),
        created_at=created,
        ready_workers=ready_workers,
    )
