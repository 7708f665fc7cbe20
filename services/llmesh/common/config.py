"""The typed, frozen configuration of the whole platform, read once at start-up.

Sources, later ones winning: built-in defaults, a YAML file, then environment variables named
`LLMESH_<SECTION>__<FIELD>` (e.g. `LLMESH_SERVER__GATEWAY_PORT=6000`,
`LLMESH_DATABASE__URL=postgresql+psycopg://...`). Only `main` reads the environment; everything
below it receives these objects.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

ENV_PREFIX = "LLMESH_"

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration file or an override is wrong; the message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    """Where each service listens on one machine, and limits every server shares."""

    host: str = "127.0.0.1"
    # Where Envoy's public listener binds (empty: `host`). The services themselves, with their
    # internal RPCs (worker membership, leases), listen on `host`: keep that inside the mesh.
    public_host: str = ""
    registry_port: int = 50052
    auth_port: int = 50053
    scheduler_port: int = 50054
    worker_base_port: int = 50060
    envoy_port: int = 8080
    envoy_admin_port: int = 9901
    # Envoy's worker threads (its --concurrency) when llmesh starts Envoy; 0: one per four CPU
    # cores, at least one. On a small machine every Envoy thread competes with the engine, and one
    # thread proxies several thousand tokens/s (llmesh bench: 2 cores, 1 thread vs 2: Envoy CPU per
    # token -15 %, throughput no lower).
    envoy_worker_threads: int = 0
    # Keep llmesh's own processes (Envoy, the services, a worker's relay and its engine core) off
    # the CPUs a vLLM CPU engine binds its model computation to (llmesh.common.cpu_placement): the
    # niced model then never waits for the data plane (measured: README, Performance).
    isolate_engine_cpus: bool = True
    # Largest request body any server accepts (the seed's 10 MB).
    max_request_bytes: int = 10 * 1024 * 1024
    # On SIGTERM: health turns NOT_SERVING (workers also leave the pool) and new requests are still
    # taken for `drain_delay_seconds` while load balancers notice; then in-flight RPCs (token
    # streams) get up to `shutdown_grace_seconds` to finish before they are cancelled.
    shutdown_grace_seconds: float = 30.0
    drain_delay_seconds: float = 1.0


@dataclass(frozen=True)
class EndpointsConfig:
    """Addresses services dial to reach each other; empty means host:port from `server`."""

    registry: str = ""
    auth: str = ""
    scheduler: str = ""


@dataclass(frozen=True)
class DatabaseConfig:
    """SQL store of the registry catalog and auth data (SQLite by default)."""

    url: str = ""  # empty: sqlite file under the data directory
    echo: bool = False


@dataclass(frozen=True)
class RedisConfig:
    """Shared counters (rate limits). Empty url: in-process counters."""

    url: str = ""


@dataclass(frozen=True)
class AuthConfig:
    """AuthService: whether credentials are required, token lifetimes, API-key hashing, admission.

    Secrets here come from the environment in production (`LLMESH_AUTH__KEY_SECRET`,
    `LLMESH_AUTH__ADMIN_PASSWORD`); an empty key secret makes AuthService generate one and keep it
    in its database.
    """

    enabled: bool = False
    # Access and refresh token lifetimes (the seeds' 24 h / 168 h).
    access_token_hours: float = 24.0
    refresh_token_hours: float = 168.0
    issuer: str = "llmesh"
    # JWT signature algorithm for new signing keys: EdDSA (Ed25519) or RS256.
    jwt_algorithm: str = "EdDSA"
    # HMAC-SHA256 secret API keys are hashed with; empty: generated once and stored in the database.
    key_secret: str = ""
    # Admin created on first start when no admin exists; empty password: a random one, printed once.
    admin_username: str = "admin"
    admin_password: str = ""
    # Whether anyone may call Register (public route); admins can always create users and keys.
    allow_registration: bool = False
    # Token credits a new user starts with; -1 for unlimited.
    default_credits: int = 1_000_000
    # Credits charged per token (prompt and completion alike).
    credits_per_token: float = 1.0
    # Default limits of a new user (0: none); keys may set tighter ones.
    default_rpm: int = 0
    default_tpm: int = 0
    default_max_parallel: int = 0
    # Output tokens reserved when a request sets no max_tokens.
    default_max_tokens: int = 1024
    # A reservation nobody settled (crashed caller) is settled after this many seconds.
    reservation_timeout_seconds: float = 900.0
    # How long a resolved credential is cached; revocation also reaches caches by Redis pub/sub.
    credential_cache_seconds: float = 2.0


@dataclass(frozen=True)
class TemplateConfig:
    """A scenario prompt template."""

    name: str
    system_prompt: str = ""
    user_template: str = "{input}"


@dataclass(frozen=True)
class ModelConfig:
    """One catalog model and the engine settings a worker loads it with."""

    name: str
    path: str = ""  # weights directory; empty in `llmesh up` means the generated tiny model
    engine: str = "vllm"
    version: str = "v1"
    aliases: tuple[str, ...] = ()
    description: str = ""
    owned_by: str = "llmesh"
    dtype: str = "auto"
    quantization: str = ""
    max_model_len: int = 2048
    max_output_tokens: int = 1024
    tensor_parallel_size: int = 1
    max_num_seqs: int = 64
    gpu_memory_utilization: float = 0.9
    kv_cache_space_gb: float = 1.0
    trust_remote_code: bool = False
    enforce_eager: bool = True
    # vLLM: nice value of the engine's processes, so Envoy and the relay never queue behind its
    # busy-polling engine core on a CPU-only host (llmesh.worker.engine_priority); 0: the worker's.
    engine_nice: int = 10
    chat_template: str = ""
    # vLLM: the tool parser (vLLM's ToolParserManager name: "hermes", "llama3_json", "mistral" ...)
    # that finds tool calls in the output for tool_choice "auto"; empty: the model has none.
    tool_parser: str = ""
    upstream_model: str = ""  # openai/anthropic: the model's name at the upstream (default: name)
    # openai/anthropic engines: where the upstream listens and how to authenticate. The key comes
    # from `api_key`, else from the environment variable named by `api_key_env`; it is never logged.
    base_url: str = ""
    api_key_env: str = ""
    api_key: str = field(default="", repr=False)
    # openai engine: a local tokenizer (directory or hub id) for tokenize, context checks and usage
    # when the upstream does not report it.
    tokenizer: str = ""
    request_timeout_seconds: float = 60.0  # upstream: connect and between-bytes timeout
    max_retries: int = 2  # upstream: attempts after the first, only before the answer starts
    # llamacpp engine (`path` is the .gguf file; `max_model_len` is its context size n_ctx).
    n_threads: int = 0  # 0: llama.cpp's default (the machine's cores)
    n_parallel: int = 1  # requests generating at once (one llama.cpp context each); more wait
    cost_per_1k_tokens: float = 0.0
    templates: tuple[TemplateConfig, ...] = ()


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process: which models it serves and where it listens."""

    worker_id: str = "worker-0"
    models: tuple[str, ...] = ()  # empty: every configured model
    port: int = 0  # 0: server.worker_base_port + index
    advertise_address: str = ""  # what others dial; empty: host:bound port
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RegistryConfig:
    """Worker membership timing, and a models YAML upserted into the catalog at start-up."""

    heartbeat_interval_seconds: int = 2
    heartbeat_ttl_seconds: int = 10
    # Path of a models YAML (ExportModels' format) upserted at every registry start; empty: none.
    models_file: str = ""
    # SupervisorService ("host:port") that StartModelInstance/StopModelInstance drive; `llmesh up`
    # sets it to its own. Empty: none (those RPCs answer FAILED_PRECONDITION).
    supervisor_address: str = ""


@dataclass(frozen=True)
class SchedulerConfig:
    """Lease and queue behaviour."""

    # How long an Acquire may wait for capacity when the caller set no deadline.
    max_queue_wait_seconds: float = 30.0
    # Waiting requests per model before new ones are refused.
    max_queue_depth: int = 256
    # A lease not released within this many seconds is reclaimed (a picker stream that never ended).
    lease_timeout_seconds: float = 900.0
    # Seconds a failed worker is excluded from new leases.
    eject_seconds: float = 10.0


@dataclass(frozen=True)
class LoggingConfig:
    """Log level and format."""

    level: str = "INFO"
    json: bool = True


@dataclass(frozen=True)
class MonitoringConfig:
    """Prometheus `/metrics` side ports, one per process.

    `metrics_base_port` 0 (the default): every process binds a free port and reports it in its
    ready file (`llmesh up` prints the URLs). N > 0: registry N, scheduler N+1, auth N+2, worker i
    N+10+i (one pod per process in Kubernetes: each knows its port).
    """

    metrics_enabled: bool = True
    # Where the side ports bind; empty: server.host. In Kubernetes the apps listen on loopback
    # behind their sidecar, so Prometheus needs this on the pod's address (0.0.0.0).
    metrics_host: str = ""
    metrics_base_port: int = 0
    # OpenTelemetry traces: an OTLP/gRPC collector ("http://collector:4317"); empty: no export.
    otlp_endpoint: str = ""
    # Print every span to stderr (`llmesh serve --trace-console` sets it too).
    trace_console: bool = False


@dataclass(frozen=True)
class TlsConfig:
    """mTLS between the services on one machine (`llmesh up --tls`).

    In Kubernetes the Envoy sidecars carry mTLS and the apps stay plaintext on loopback (leave this
    off there). On one machine every process shares the loopback, so with `enabled` each gRPC
    server requires a client certificate signed by the mesh CA, every channel between services
    presents the caller's own certificate and checks the peer's, and the local Envoy edge speaks
    mTLS to every upstream. `dir` is what `llmesh certs --out DIR` writes: `<identity>/ca.crt`,
    `tls.crt`, `tls.key` per identity (registry, scheduler, auth, workers, edge); empty means
    `<data-dir>/tls`.
    """

    enabled: bool = False
    dir: str = ""


# Offsets of each process's metrics port from `monitoring.metrics_base_port`.
METRICS_PORT_OFFSETS = {"registry": 0, "scheduler": 1, "auth": 2, "worker": 10}


@dataclass(frozen=True)
class LlmeshConfig:
    """Everything one config file holds."""

    server: ServerConfig = ServerConfig()
    endpoints: EndpointsConfig = EndpointsConfig()
    database: DatabaseConfig = DatabaseConfig()
    redis: RedisConfig = RedisConfig()
    auth: AuthConfig = AuthConfig()
    models: tuple[ModelConfig, ...] = ()
    workers: tuple[WorkerConfig, ...] = ()
    registry: RegistryConfig = RegistryConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    logging: LoggingConfig = LoggingConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    tls: TlsConfig = TlsConfig()

    def address_of(self, service: str) -> str:
        """The address to dial for `service` (registry, auth, scheduler)."""
        explicit = getattr(self.endpoints, service)
        if explicit:
            return str(explicit)
        return f"{self.server.host}:{getattr(self.server, f'{service}_port')}"

    def metrics_listen(self, service: str, worker_index: int = 0) -> str:
        """Where `service`'s `/metrics` side port binds ("host:port"); "" when metrics are off."""
        m = self.monitoring
        if not m.metrics_enabled:
            return ""
        host = m.metrics_host or self.server.host
        if m.metrics_base_port <= 0:
            return f"{host}:0"
        offset = METRICS_PORT_OFFSETS[service] + (worker_index if service == "worker" else 0)
        return f"{host}:{m.metrics_base_port + offset}"

    def model(self, name: str) -> ModelConfig:
        """The configured model called `name` (or one of its aliases)."""
        for m in self.models:
            if m.name == name or name in m.aliases:
                return m
        raise ConfigError(f"no model named {name!r} in the config; known: {[m.name for m in self.models]}")


def build(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from plain YAML data, checking names and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    values = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)  # type: ignore[arg-type]
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        return {str(k): str(v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in {"1", "true", "yes", "on"}:
                return True
            if value.lower() in {"0", "false", "no", "off"}:
                return False
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay LLMESH_SECTION__FIELD variables onto the YAML data."""
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> LlmeshConfig:
    """Read the config file (if any) and environment overrides into one frozen object."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = loaded
    data = _apply_env(data, env or {})
    return build(LlmeshConfig, data)


def with_overrides(cfg: LlmeshConfig, **sections: Any) -> LlmeshConfig:
    """A copy of `cfg` with whole sections replaced (used by `llmesh up` and tests)."""
    return dataclasses.replace(cfg, **sections)
