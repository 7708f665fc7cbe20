"""The models YAML: what ImportModels, `--models-file` and the config's `models:` read, and what
ExportModels writes (canonical, so export -> import -> export is byte-stable)."""

from __future__ import annotations

from typing import Any

import yaml

from llmesh.common.errors import InvalidRequest
from llmesh.registry.model_spec import ModelSpec, spec_from_mapping


def parse_models_yaml(text: str) -> list[ModelSpec]:
    """A models YAML (`models:` list, or a bare list) as specs; errors name `models[i].field`."""
    try:
        data = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise InvalidRequest(f"yaml: not valid YAML: {e}") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"models"})
        if unknown:
            raise InvalidRequest(f"yaml: unknown top-level key(s) {unknown}; expected `models:`")
        data = data.get("models")
    if not isinstance(data, list) or not data:
        raise InvalidRequest("yaml: expected a non-empty `models:` list (see ExportModels for the format)")
    specs = [spec_from_mapping(m, f"models[{i}]") for i, m in enumerate(data)]
    seen: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.key in seen:
            raise InvalidRequest(f"models[{i}]: {s.key} also appears as models[{seen[s.key]}]")
        seen[s.key] = i
    return specs


def dump_models_yaml(entries: list[dict[str, Any]]) -> str:
    """Canonical entries (see `to_export_mapping`) as YAML: key order kept, nothing wrapped."""
    return yaml.safe_dump(
        {"models": entries}, sort_keys=False, allow_unicode=True, default_flow_style=False, width=4096
    )
