"""Catalog rows to `registry.v1.Model` messages, and Model messages (CreateModel, UpdateModel with
an update mask) to checked `ModelSpec`s."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from llmesh.common.errors import InvalidRequest
from llmesh.common.v1 import common_pb2
from llmesh.registry.catalog_rows import CatalogModel, status_key
from llmesh.registry.model_spec import (
    DEPLOY_DEFAULTS,
    LIMITS_DEFAULTS,
    SAMPLING_RANGES,
    ModelSpec,
    f32,
    spec_from_mapping,
    to_export_mapping,
)
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

# Statuses that turn READY on reads while a ready worker serves the model.
_SHOWN_READY_WHEN_SERVED = (registry_pb2.MODEL_STATUS_REGISTERED, registry_pb2.MODEL_STATUS_DEPLOYING)

# Sections an update mask may name, with their sub-keys as the proto spells them.
_ENGINE_FIELDS = tuple(f.name for f in registry_pb2.EngineSettings.DESCRIPTOR.fields)
_SECTIONS: dict[str, tuple[str, ...]] = {
    "engine": _ENGINE_FIELDS,
    "limits": tuple(LIMITS_DEFAULTS),
    "deploy": tuple(DEPLOY_DEFAULTS),
    "default_sampling": (*SAMPLING_RANGES, "stop"),
}
_SCALARS = ("description", "owned_by", "status", "cost_per_1k_tokens")
_LISTS = ("templates", "aliases", "labels")
UPDATABLE = (*_SCALARS, *_SECTIONS, *_LISTS)
_FIXED = {
    "name": "name selects the model and cannot be changed (create a new model instead)",
    "version": "version selects the row and cannot be changed (CreateModel a new version instead)",
    "etag": "etag is the row version; pass it in UpdateModelRequest.etag",
    "created_at": "created_at is set by the registry",
    "updated_at": "updated_at is set by the registry",
    "ready_workers": "ready_workers comes from live membership",
    "traffic_weight": "traffic_weight is set with SetTrafficWeights",
}


def _known_fields(message_cls: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Only the keys the message has (the catalog may hold settings v1 does not carry)."""
    names = {f.name for f in message_cls.DESCRIPTOR.fields}
    return {k: v for k, v in values.items() if k in names and v is not None}


def _timestamp(value: Any) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def model_to_proto(model: CatalogModel, ready_workers: int) -> registry_pb2.Model:
    """The wire form of a catalog model; `ready_workers` comes from live membership."""
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
        created_at=_timestamp(model.created_at),
        ready_workers=ready_workers,
        default_sampling=common_pb2.SamplingParams(
            **_known_fields(common_pb2.SamplingParams, model.default_sampling)
        ),
        labels=model.labels,
        etag=model.etag,
        traffic_weight=model.traffic_weight,
        updated_at=_timestamp(model.updated_at),
    )


def _proto_mapping(model: registry_pb2.Model) -> dict[str, Any]:
    """Every field of a Model message as YAML-style data (zero values included)."""
    engine: dict[str, Any] = {}
    for f in registry_pb2.EngineSettings.DESCRIPTOR.fields:
        value = getattr(model.engine, f.name)
        engine[f.name] = f32(value) if isinstance(value, float) else value
    sampling: dict[str, Any] = {}
    for key in SAMPLING_RANGES:
        if model.default_sampling.HasField(key):
            value = getattr(model.default_sampling, key)
            sampling[key] = f32(value) if isinstance(value, float) else value
    if model.default_sampling.stop:
        sampling["stop"] = list(model.default_sampling.stop)
    return {
        "description": model.description,
        "owned_by": model.owned_by,
        "status": status_key(model.status) if model.status else None,
        "cost_per_1k_tokens": model.cost_per_1k_tokens,
        "engine": engine,
        "limits": {k: getattr(model.limits, k) for k in LIMITS_DEFAULTS},
        "deploy": {k: getattr(model.deploy, k) for k in DEPLOY_DEFAULTS},
        "default_sampling": sampling,
        "templates": [
            {"name": t.name, "system_prompt": t.system_prompt, "user_template": t.user_template}
            for t in model.templates
        ],
        "aliases": list(model.aliases),
        "labels": dict(model.labels),
    }


def _without_zeros(section: dict[str, Any]) -> dict[str, Any]:
    # proto3 cannot tell "unset" from 0/"": a zero means "the default".
    return {k: v for k, v in section.items() if v not in (0, 0.0, "", None)}


def spec_for_create(model: registry_pb2.Model) -> ModelSpec:
    """The spec of a CreateModel request (zero values take the defaults)."""
    if model.status not in (registry_pb2.MODEL_STATUS_UNSPECIFIED, registry_pb2.MODEL_STATUS_REGISTERED):
        raise InvalidRequest(
            f"model.status: a new model starts registered, not {status_key(model.status)}; "
            "move it along the lifecycle with UpdateModel"
        )
    if model.traffic_weight:
        raise InvalidRequest(
            "model.traffic_weight: set weights with SetTrafficWeights once the versions exist"
        )
    given = _proto_mapping(model)
    data: dict[str, Any] = {
        "name": model.name,
        "version": model.version or "v1",
        "description": given["description"],
        "owned_by": given["owned_by"],
        "status": "registered",
        "cost_per_1k_tokens": given["cost_per_1k_tokens"],
        "engine": _without_zeros(given["engine"]) | {"trust_remote_code": model.engine.trust_remote_code},
        "limits": _without_zeros(given["limits"]),
        "deploy": given["deploy"],
        "default_sampling": given["default_sampling"],
        "templates": given["templates"],
        "labels": given["labels"],
        # No aliases listed: leave the name's aliases alone (a new version keeps the old ones).
        "aliases": given["aliases"] or None,
    }
    return spec_from_mapping(data, "model")


def _mask_for(model: registry_pb2.Model) -> list[str]:
    """The paths an empty update mask stands for: every field the request set to a non-zero value."""
    given = _proto_mapping(model)
    paths = [k for k in _SCALARS if given[k] not in (None, "", 0, 0.0)]
    for section in ("engine", "limits", "deploy"):
        if model.HasField(section):
            paths += [f"{section}.{k}" for k, v in given[section].items() if v not in (0, 0.0, "", False)]
    if model.HasField("default_sampling"):
        paths += [f"default_sampling.{k}" for k in given["default_sampling"]]
    paths += [k for k in _LISTS if given[k]]
    return paths


def spec_for_update(current: CatalogModel, model: registry_pb2.Model, update_mask: list[str]) -> ModelSpec:
    """Apply the masked fields of `model` to the stored row; errors name `update_mask[i]` or `model.x`."""
    given = _proto_mapping(model)
    paths = list(update_mask) or _mask_for(model)
    if not paths:
        raise InvalidRequest(
            "update_mask: nothing to update (set fields on model, or list them in update_mask)"
        )
    merged = to_export_mapping(current.to_spec(), current.aliases)
    merged["engine"] = dict(merged["engine"])
    for i, path in enumerate(paths):
        at = f"update_mask[{i}]" if update_mask else f"model.{path}"
        head, _, sub = path.partition(".")
        if head in _FIXED:
            raise InvalidRequest(f"{at}: {_FIXED[head]}")
        if head not in UPDATABLE or (sub and (head not in _SECTIONS or sub not in _SECTIONS[head])):
            raise InvalidRequest(
                f"{at}: unknown field {path!r}; updatable: {list(UPDATABLE)} and their sub-fields"
            )
        if head == "status" and given["status"] is None:
            raise InvalidRequest(f"{at}: model.status is unset; give the status to move to")
        if not sub:
            value = given[head]
            if head in ("engine", "limits"):
                # Keep the settings v1 does not carry (kv_cache_space_gb, enforce_eager).
                value = {**merged[head], **_without_zeros(value)}
                if head == "engine":
                    value["trust_remote_code"] = model.engine.trust_remote_code
            merged[head] = value
        elif head == "default_sampling":
            sampling = dict(merged[head])
            if sub in given[head]:
                sampling[sub] = given[head][sub]
            else:
                sampling.pop(sub, None)
            merged[head] = sampling
        else:
            merged[head] = {**merged[head], sub: given[head][sub]}
    merged.pop("traffic_weight")
    return spec_from_mapping(merged, "model")
