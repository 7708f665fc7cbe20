"""What a catalog row holds, in one canonical form, checked field by field.

Every way into the catalog (the config file's `models:`, a models YAML, CreateModel/UpdateModel)
becomes a `ModelSpec`; validation errors name the field (`models[2].engine.dtype`,
`model.limits.max_output_tokens`) so the caller knows what to fix. The canonical form is what makes
import → export → import byte-stable: every section has a fixed key order and every key is written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmesh.common.config import ModelConfig
from llmesh.common.errors import FailedPrecondition, InvalidRequest
from llmesh.registry.schema import NAME_LEN, VERSION_LEN
from llmesh.registry.tool_parsers import PARSER_ENGINE, check_tool_parser, vllm_tool_parsers
from llmesh.worker.engine_factory import ENGINES as WORKER_ENGINES

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})$")

# The catalog accepts exactly the engines a worker can build (one list, the worker's factory's).
ENGINES = WORKER_ENGINES
DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float")

# Section defaults, in the order they are exported.
ENGINE_DEFAULTS: dict[str, Any] = {
    "engine": "vllm",
    "source": "",
    "dtype": "auto",
    "quantization": "",
    "max_model_len": 2048,
    "tensor_parallel_size": 1,
    "max_num_seqs": 64,
    "gpu_memory_utilization": 0.9,
    "trust_remote_code": False,
    "chat_template": "",
    "upstream_model": "",
    "tool_parser": "",
    "kv_cache_space_gb": 1.0,
    "enforce_eager": True,
}
LIMITS_DEFAULTS: dict[str, Any] = {
    "max_output_tokens": 1024,
    "max_prompt_tokens": 0,
    "requests_per_minute": 0,
}
DEPLOY_DEFAULTS: dict[str, Any] = {
    "min_replicas": 0,
    "max_replicas": 0,
    "scale_up_queue_depth": 0,
    "cooldown_seconds": 0,
}
# Default sampling keys (all optional) with their allowed ranges; order is the export order.
SAMPLING_RANGES: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 1e-9, 1.0),
    "top_k": (int, -1, 1 << 20),
    "min_p": (float, 0.0, 1.0),
    "presence_penalty": (float, -2.0, 2.0),
    "frequency_penalty": (float, -2.0, 2.0),
    "repetition_penalty": (float, 1e-9, 2.0),
    "seed": (int, -(1 << 63), (1 << 63) - 1),
    "max_tokens": (int, 1, 1 << 24),
    "min_tokens": (int, 0, 1 << 24),
}
TEMPLATE_KEYS = ("name", "system_prompt", "user_template")
# Model statuses as written in YAML, in lifecycle order.
STATUSES = ("registered", "deploying", "ready", "draining", "retired")
# The lifecycle: which status may follow which.
ALLOWED_STEPS: dict[str, frozenset[str]] = {
    "registered": frozenset({"deploying", "retired"}),
    "deploying": frozenset({"ready", "registered", "draining"}),
    "ready": frozenset({"draining", "deploying"}),
    "draining": frozenset({"retired", "ready"}),
    "retired": frozenset({"registered"}),
}


def check_step(current: str, wanted: str, where: str) -> None:
    """Refuse a status change that is not a lifecycle edge (FAILED_PRECONDITION names the field)."""
    if current != wanted and wanted not in ALLOWED_STEPS[current]:
        allowed = sorted(ALLOWED_STEPS[current], key=STATUSES.index)
        raise FailedPrecondition(
            f"{where}: a model cannot go from {current} to {wanted}; from {current} it may go to {allowed}"
        )


def f32(value: float) -> float:
    """A float that came through a protobuf `float`, rounded back to what a person typed (0.7)."""
    return float(f"{value:.7g}")


@dataclass(frozen=True)
class ModelSpec:
    """The content of one catalog row (a model name at one version), canonical and valid."""

    name: str
    version: str = "v1"
    description: str = ""
    owned_by: str = ""
    # None: keep the stored status (new rows start registered).
    status: str | None = None
    engine: dict[str, Any] = field(default_factory=lambda: dict(ENGINE_DEFAULTS))
    limits: dict[str, Any] = field(default_factory=lambda: dict(LIMITS_DEFAULTS))
    default_sampling: dict[str, Any] = field(default_factory=dict)
    templates: tuple[dict[str, str], ...] = ()
    cost_per_1k_tokens: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    deploy: dict[str, Any] = field(default_factory=lambda: dict(DEPLOY_DEFAULTS))
    # None: keep the stored weight (new rows start at 0).
    traffic_weight: int | None = None
    # None: leave the name's aliases as they are; a tuple: exactly these.
    aliases: tuple[str, ...] | None = None

    @property
    def key(self) -> str:
        """`name@version`, how messages and import reports name a row."""
        return f"{self.name}@{self.version}"

    def content(self) -> dict[str, Any]:
        """Everything stored in the row (no aliases), for change detection and the audit table."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "owned_by": self.owned_by,
            "status": self.status,
            "engine": self.engine,
            "limits": self.limits,
            "default_sampling": self.default_sampling,
            "templates": [dict(t) for t in self.templates],
            "cost_per_1k_tokens": self.cost_per_1k_tokens,
            "labels": self.labels,
            "deploy": self.deploy,
            "traffic_weight": self.traffic_weight,
        }


def check_name(value: Any, where: str) -> str:
    """A model name or alias: 1..255 characters, letters, digits and . _ : / -."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where} is required: a model name such as 'qwen2-0.5b-instruct'")
    if len(value) > NAME_LEN or not NAME_RE.match(value):
        raise InvalidRequest(
            f"{where} {value!r} is not a valid name: 1..{NAME_LEN} characters, starting with a letter "
            "or digit, then letters, digits and . _ : / -"
        )
    return value


def check_version(value: Any, where: str) -> str:
    """A version label such as 'v1' or '2024-06-01'."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where} is required: a version label such as 'v1'")
    if len(value) > VERSION_LEN or not VERSION_RE.match(value):
        raise InvalidRequest(
            f"{where} {value!r} is not a valid version: 1..{VERSION_LEN} letters, digits and . _ -"
        )
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _number(value: Any, kind: type, lo: float, hi: float, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{where} must be a number, got {value!r}")
    if kind is int and (isinstance(value, float) and not value.is_integer()):
        raise InvalidRequest(f"{where} must be a whole number, got {value!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidRequest(f"{where} is {value!r}; it must be between {lo:g} and {hi:g}")
    return int(value) if kind is int else float(value)


def _string(value: Any, where: str, limit: int = 1 << 20) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidRequest(f"{where} is {len(value)} characters; at most {limit} allowed")
    return value


def _section(
    value: Any, defaults: dict[str, Any], where: str, checks: dict[str, tuple[type, float, float]]
) -> dict[str, Any]:
    given = _mapping(value, where)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise InvalidRequest(f"{where}: unknown key(s) {unknown}; allowed: {list(defaults)}")
    out: dict[str, Any] = {}
    for key, default in defaults.items():
        v = given.get(key, default)
        if v is None:
            v = default
        if key in checks:
            kind, lo, hi = checks[key]
            out[key] = _number(v, kind, lo, hi, f"{where}.{key}")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise InvalidRequest(f"{where}.{key} must be true or false, got {v!r}")
            out[key] = v
        else:
            out[key] = _string(v, f"{where}.{key}")
    return out


_ENGINE_CHECKS: dict[str, tuple[type, float, float]] = {
    "max_model_len": (int, 1, 10_000_000),
    "tensor_parallel_size": (int, 1, 64),
    "max_num_seqs": (int, 1, 65_536),
    "gpu_memory_utilization": (float, 0.01, 1.0),
    "kv_cache_space_gb": (float, 0.0, 100_000.0),
}
_LIMITS_CHECKS: dict[str, tuple[type, float, float]] = {
    "max_output_tokens": (int, 1, 10_000_000),
    "max_prompt_tokens": (int, 0, 10_000_000),
    "requests_per_minute": (int, 0, 100_000_000),
}
_DEPLOY_CHECKS: dict[str, tuple[type, float, float]] = {k: (int, 0, 100_000) for k in DEPLOY_DEFAULTS}


def check_engine(value: Any, where: str) -> dict[str, Any]:
    """Engine settings with defaults filled in."""
    engine = _section(value, ENGINE_DEFAULTS, where, _ENGINE_CHECKS)
    if engine["engine"] not in ENGINES:
        raise InvalidRequest(f"{where}.engine {engine['engine']!r} is not one of {list(ENGINES)}")
    if engine["dtype"] not in DTYPES:
        raise InvalidRequest(f"{where}.dtype {engine['dtype']!r} is not one of {list(DTYPES)}")
    if engine["tool_parser"]:
        # The first check of a vllm parser asks vLLM for its names (seconds, once per process).
        known = vllm_tool_parsers() if engine["engine"] == PARSER_ENGINE else None
        check_tool_parser(engine["tool_parser"], engine["engine"], known, f"{where}.tool_parser")
    return engine


def check_sampling(value: Any, where: str) -> dict[str, Any]:
    """Per-model default sampling: only the keys given, each in range."""
    given = _mapping(value, where)
    unknown = sorted(set(given) - set(SAMPLING_RANGES) - {"stop"})
    if unknown:
        raise InvalidRequest(f"{where}: unknown key(s) {unknown}; allowed: {[*SAMPLING_RANGES, 'stop']}")
    out: dict[str, Any] = {}
    for key, (kind, lo, hi) in SAMPLING_RANGES.items():
        if given.get(key) is not None:
            out[key] = _number(given[key], kind, lo, hi, f"{where}.{key}")
    if given.get("stop"):
        stop = given["stop"]
        if not isinstance(stop, list | tuple) or len(stop) > 16:
            raise InvalidRequest(f"{where}.stop must be a list of at most 16 strings")
        out["stop"] = [_string(s, f"{where}.stop[{i}]", 256) for i, s in enumerate(stop)]
    return out


def check_templates(value: Any, where: str) -> tuple[dict[str, str], ...]:
    """Scenario templates: each named once, with a system prompt and a user template."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise InvalidRequest(f"{where} must be a list of templates")
    out = []
    seen: set[str] = set()
    for i, t in enumerate(value):
        at = f"{where}[{i}]"
        t = _mapping(t, at)
        unknown = sorted(set(t) - set(TEMPLATE_KEYS))
        if unknown:
            raise InvalidRequest(f"{at}: unknown key(s) {unknown}; allowed: {list(TEMPLATE_KEYS)}")
        name = t.get("name")
        if not isinstance(name, str) or not name or not NAME_RE.match(name) or len(name) > 64:
            raise InvalidRequest(
                f"{at}.name is required: a scenario name such as 'qa' (letters, digits, . _ -)"
            )
        if name in seen:
            raise InvalidRequest(f"{at}.name {name!r} appears twice; scenario names are unique per model")
        seen.add(name)
        user_template = _string(t.get("user_template") or "{input}", f"{at}.user_template", 65_536)
        out.append(
            {
                "name": name,
                "system_prompt": _string(t.get("system_prompt") or "", f"{at}.system_prompt", 65_536),
                "user_template": user_template,
            }
        )
    return tuple(out)


def check_labels(value: Any, where: str) -> dict[str, str]:
    """Labels: short keys, string values, sorted."""
    given = _mapping(value, where)
    out = {}
    for key in sorted(given, key=str):
        if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
            raise InvalidRequest(f"{where}: label key {key!r} must be 1..63 letters, digits and . _ / -")
        v = given[key]
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise InvalidRequest(f"{where}.{key} must be a string")
        out[key] = _string(str(v), f"{where}.{key}", 255)
    return out


def check_status(value: Any, where: str) -> str:
    """A lifecycle status by its YAML name (also accepts MODEL_STATUS_READY and READY)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be one of {list(STATUSES)}")
    name = value.lower().removeprefix("model_status_")
    if name not in STATUSES:
        raise InvalidRequest(f"{where} {value!r} is not one of {list(STATUSES)}")
    return name


def check_aliases(value: Any, name: str, where: str) -> tuple[str, ...]:
    """Aliases of a model: valid names, none equal to the model's own name, sorted, unique."""
    if not isinstance(value, list | tuple):
        raise InvalidRequest(f"{where} must be a list of names")
    out = []
    for i, a in enumerate(value):
        check_name(a, f"{where}[{i}]")
        if a == name:
            raise InvalidRequest(f"{where}[{i}] {a!r} is the model's own name; an alias must differ")
        out.append(a)
    return tuple(sorted(set(out)))


def spec_from_mapping(data: Any, where: str) -> ModelSpec:
    """A spec from YAML data: the nested export form, or the config file's flat `models:` form."""
    data = dict(_mapping(data, where))
    # `engine: vllm` (a kind, flat config form) vs `engine: {...}` (the nested export form).
    flat_keys = [
        k for k in data if (k in ENGINE_DEFAULTS or k == "path") and not isinstance(data[k], Mapping)
    ]
    flat_engine = {k: data.pop(k) for k in flat_keys}
    if "path" in flat_engine:
        flat_engine["source"] = flat_engine.pop("path")
    if "max_output_tokens" in data:
        data.setdefault("limits", {})
        data["limits"] = {
            **_mapping(data["limits"], f"{where}.limits"),
            "max_output_tokens": data.pop("max_output_tokens"),
        }
    if flat_engine:
        data["engine"] = {**flat_engine, **_mapping(data.get("engine"), f"{where}.engine")}
    allowed = {
        "name", "version", "aliases", "description", "owned_by", "status", "engine", "limits",
        "default_sampling", "templates", "cost_per_1k_tokens", "labels", "deploy", "traffic_weight",
    }  # fmt: skip
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidRequest(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed | {'path'})}")
    name = check_name(data.get("name"), f"{where}.name")
    aliases = data.get("aliases")
    return ModelSpec(
        name=name,
        version=check_version(data.get("version", "v1"), f"{where}.version"),
        description=_string(data.get("description") or "", f"{where}.description", 65_536),
        owned_by=_string(data.get("owned_by") or "", f"{where}.owned_by", NAME_LEN),
        status=None if data.get("status") is None else check_status(data["status"], f"{where}.status"),
        engine=check_engine(data.get("engine"), f"{where}.engine"),
        limits=_section(data.get("limits"), LIMITS_DEFAULTS, f"{where}.limits", _LIMITS_CHECKS),
        default_sampling=check_sampling(data.get("default_sampling"), f"{where}.default_sampling"),
        templates=check_templates(data.get("templates"), f"{where}.templates"),
        cost_per_1k_tokens=_number(
            data.get("cost_per_1k_tokens", 0.0), float, 0.0, 1e9, f"{where}.cost_per_1k_tokens"
        ),
        labels=check_labels(data.get("labels"), f"{where}.labels"),
        deploy=_section(data.get("deploy"), DEPLOY_DEFAULTS, f"{where}.deploy", _DEPLOY_CHECKS),
        traffic_weight=None
        if data.get("traffic_weight") is None
        else _number(data["traffic_weight"], int, 0, 1_000_000, f"{where}.traffic_weight"),
        aliases=None if aliases is None else check_aliases(aliases, name, f"{where}.aliases"),
    )


def spec_from_config(m: ModelConfig, where: str = "models") -> ModelSpec:
    """The spec of a config file model (config models keep their status; aliases are exact)."""
    return spec_from_mapping(
        {
            "name": m.name,
            "version": m.version,
            "aliases": list(m.aliases),
            "description": m.description,
            "owned_by": m.owned_by,
            "engine": {
                "engine": m.engine,
                "source": m.path,
                "dtype": m.dtype,
                "quantization": m.quantization,
                "max_model_len": m.max_model_len,
                "tensor_parallel_size": m.tensor_parallel_size,
                "max_num_seqs": m.max_num_seqs,
                "gpu_memory_utilization": m.gpu_memory_utilization,
                "trust_remote_code": m.trust_remote_code,
                "chat_template": m.chat_template,
                "upstream_model": m.upstream_model,
                "tool_parser": m.tool_parser,
                "kv_cache_space_gb": m.kv_cache_space_gb,
                "enforce_eager": m.enforce_eager,
            },
            "limits": {"max_output_tokens": m.max_output_tokens},
            "templates": [
                {"name": t.name, "system_prompt": t.system_prompt, "user_template": t.user_template}
                for t in m.templates
            ],
            "cost_per_1k_tokens": m.cost_per_1k_tokens,
        },
        f"{where}.{m.name}",
    )


def to_export_mapping(spec: ModelSpec, aliases: tuple[str, ...]) -> dict[str, Any]:
    """The canonical YAML form of a row: fixed key order, every key present."""
    return {
        "name": spec.name,
        "version": spec.version,
        "aliases": list(aliases),
        "status": spec.status or "registered",
        "description": spec.description,
        "owned_by": spec.owned_by,
        "traffic_weight": spec.traffic_weight or 0,
        "cost_per_1k_tokens": spec.cost_per_1k_tokens,
        "engine": {k: spec.engine.get(k, d) for k, d in ENGINE_DEFAULTS.items()},
        "limits": {k: spec.limits.get(k, d) for k, d in LIMITS_DEFAULTS.items()},
        "default_sampling": {
            k: spec.default_sampling[k] for k in [*SAMPLING_RANGES, "stop"] if k in spec.default_sampling
        },
        "templates": [{k: t.get(k, "") for k in TEMPLATE_KEYS} for t in spec.templates],
        "labels": dict(sorted(spec.labels.items())),
        "deploy": {k: spec.deploy.get(k, d) for k, d in DEPLOY_DEFAULTS.items()},
    }
