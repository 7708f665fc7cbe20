"""What the edge config is rendered from: one typed, frozen settings object.

`EdgeSettings.from_config` derives it from llmesh's own config, so the Envoy in front of
`llmesh up` and the one rendered for a Kubernetes sidecar come from the same place.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmesh.common.config import LlmeshConfig

# Control-plane upstreams in the order their clusters appear; the names are those of
# `LlmeshConfig.address_of` and of the Envoy clusters. Workers are not listed: the scheduler
# tells Envoy about them (EDS) and picks one per request (ext_proc).
SERVICE_NAMES: tuple[str, ...] = ("registry", "auth", "scheduler")

# The gRPC service each upstream serves: its REST routes, its native gRPC path prefix and the
# name its health checks ask about.
GRPC_SERVICE_OF: dict[str, str] = {
    "registry": "llmesh.registry.v1.RegistryService",
    "auth": "llmesh.auth.v1.AuthService",
    "scheduler": "llmesh.scheduler.v1.SchedulerService",
}
# ModelService is split: the workers serve its inference RPCs, the registry its catalog reads.
MODEL_SERVICE = "llmesh.model.v1.ModelService"
CATALOG_CLUSTER = "registry"

# Loopback names the admin interface may bind to; it is never exposed beyond the machine.
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def collector_address(otlp_endpoint: str) -> str:
    """ "host:port" of an OTLP endpoint given as a URL ("http://collector:4317") or bare."""
    return otlp_endpoint.split("://", 1)[-1].rstrip("/")


class EdgeSettingsError(ValueError):
    """An edge setting is wrong; the message names it and says what is expected."""


def edge_tls_dir(cfg: LlmeshConfig) -> str:
    """The edge's certificate directory when mesh TLS is on (`tls.dir`/edge), else ""."""
    if not cfg.tls.enabled:
        return ""
    if not cfg.tls.dir:
        raise EdgeSettingsError("tls.dir: empty; name the directory `llmesh certs --out` wrote")
    return str(Path(cfg.tls.dir).resolve() / "edge")


@dataclass(frozen=True)
class Endpoint:
    """A "host:port" upstream address, split; `host` may be an IP literal or a DNS name."""

    host: str
    port: int

    @classmethod
    def parse(cls, address: str, what: str = "address") -> Endpoint:
        """Parse "host:port", "[v6]:port" or "v4:port"; raise EdgeSettingsError naming `what`."""
        host, sep, port_text = address.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise EdgeSettingsError(f"{what}: expected 'host:port', got {address!r}")
        port = int(port_text)
        if not 0 < port < 65536:
            raise EdgeSettingsError(f"{what}: port {port} is out of range 1-65535")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(host=host, port=port)

    @property
    def is_ip(self) -> bool:
        """True for an IP literal (a STATIC cluster); False for a DNS name (STRICT_DNS)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def dial_host(self) -> str:
        """The host to connect to: a wildcard bind address means this machine."""
        if self.host == "0.0.0.0":
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class EdgeSettings:
    """Everything the Envoy edge config depends on.

    Upstream addresses are "host:port": an IP literal becomes a STATIC cluster, a name (the
    Kubernetes service `registry:50052`) a STRICT_DNS one. Port 0 for the listener or admin lets
    the kernel pick (EnvoyProcess reads back what was bound).
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    # The admin interface (stats, /ready, /clusters) listens on loopback only.
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    registry: str = "127.0.0.1:50052"
    auth: str = "127.0.0.1:50053"
    scheduler: str = "127.0.0.1:50054"
    # The descriptor set from `make gen` (gen/llmesh/llmesh_descriptor.pb).
    descriptor_path: str = "gen/llmesh/llmesh_descriptor.pb"
    # Largest request body: Lua buffering, the transcoder and per-connection buffers (10 MiB).
    max_request_bytes: int = 10 * 1024 * 1024
    # Largest unary JSON response the transcoder assembles.
    max_response_bytes: int = 64 * 1024 * 1024
    # "/dev/stdout", a file, or "" for no access log.
    access_log_path: str = "/dev/stdout"
    # A stream with no bytes either way for this long is reset. Generous: a unary chat completion
    # of a long answer sends nothing until it is done. Streams that carry tokens never hit it.
    stream_idle_timeout_s: float = 900.0
    # Active gRPC health checks of the control-plane services: generous enough that a busy but
    # live process passes (a failed check ejects the only replica), frequent enough to notice a
    # restart within seconds. Workers are not actively checked: EDS says which are in the pool and
    # outlier detection ejects one that fails (never one that is merely busy).
    health_check_interval_s: float = 3.0
    health_check_timeout_s: float = 5.0
    health_check_unhealthy_threshold: int = 3
    connect_timeout_s: float = 2.0
    # How long Envoy waits at start for the scheduler's first list of workers (EDS) before it
    # serves anyway: with the scheduler down, the catalog and auth routes answer after this long and
    # inference answers 503 until the list arrives.
    workers_initial_fetch_timeout_s: float = 15.0
    # How long Envoy waits for the endpoint picker's answer: it may queue a request for capacity up
    # to the scheduler's max queue wait, so this must exceed that.
    picker_timeout_s: float = 35.0
    # Retries of an inference request on the picker's fallback workers, before its first byte only.
    worker_retries: int = 2
    # Outlier detection on workers: consecutive gateway failures (UNAVAILABLE, resets, connect
    # failures) before a worker is ejected, and for how long at first.
    worker_eject_after_failures: int = 3
    worker_eject_seconds: float = 10.0
    # Every public request is checked by AuthService (Envoy ext_authz) when true.
    auth_enabled: bool = False
    # Envoy's worker threads (--concurrency); 0: one per four CPU cores, at least one
    # (`worker_thread_count`).
    worker_threads: int = 0
    # Envoy's node id and cluster, shown in its admin interface and logs.
    node_id: str = "llmesh-edge"
    # OTLP/gRPC collector ("host:port") Envoy exports its request spans to; empty: no tracing.
    otlp_endpoint: str = ""
    # mTLS to every llmesh upstream (control plane and workers) with the edge's certificate from
    # this directory (ca.crt, tls.crt, tls.key, as `llmesh certs` writes them); empty: plaintext.
    upstream_tls_dir: str = ""

    def __post_init__(self) -> None:
        if self.admin_host not in _LOOPBACK_HOSTS:
            raise EdgeSettingsError(
                f"admin_host: the admin interface must stay on loopback ({sorted(_LOOPBACK_HOSTS)}), "
                f"got {self.admin_host!r}"
            )
        for name in ("listen_port", "admin_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise EdgeSettingsError(f"{name}: {port} is out of range 0-65535")
        for name in SERVICE_NAMES:
            Endpoint.parse(getattr(self, name), name)
        if self.max_request_bytes < 1024:
            raise EdgeSettingsError(f"max_request_bytes: {self.max_request_bytes} is below 1 KiB")
        if self.max_response_bytes < 1024:
            raise EdgeSettingsError(f"max_response_bytes: {self.max_response_bytes} is below 1 KiB")
        if self.max_request_bytes >= 2**32 or self.max_response_bytes >= 2**32:
            raise EdgeSettingsError("max_request_bytes and max_response_bytes must be below 4 GiB")
        if not self.descriptor_path:
            raise EdgeSettingsError("descriptor_path: empty; run `make gen` and pass its descriptor set")
        for name in (
            "stream_idle_timeout_s",
            "health_check_interval_s",
            "health_check_timeout_s",
            "picker_timeout_s",
            "worker_eject_seconds",
            "workers_initial_fetch_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise EdgeSettingsError(f"{name}: must be positive")
        if self.worker_retries < 0 or self.worker_eject_after_failures < 1:
            raise EdgeSettingsError("worker_retries must be >= 0 and worker_eject_after_failures >= 1")
        if self.health_check_unhealthy_threshold < 1:
            raise EdgeSettingsError("health_check_unhealthy_threshold: must be >= 1")
        if self.worker_threads < 0:
            raise EdgeSettingsError(f"worker_threads: {self.worker_threads} is negative (0 picks a count)")
        if self.connect_timeout_s <= 0:
            raise EdgeSettingsError("connect_timeout_s: must be positive")
        if self.otlp_endpoint:
            Endpoint.parse(self.otlp_endpoint, "otlp_endpoint")

    def worker_thread_count(self) -> int:
        """The Envoy worker threads to start: `worker_threads`, or one per four CPU cores."""
        return self.worker_threads or max(1, (os.cpu_count() or 1) // 4)

    def upstream(self, service: str) -> Endpoint:
        """The parsed address of `service` (registry, auth, scheduler)."""
        if service not in SERVICE_NAMES:
            raise EdgeSettingsError(f"unknown service {service!r}; known: {list(SERVICE_NAMES)}")
        return Endpoint.parse(getattr(self, service), service)

    @classmethod
    def from_config(cls, cfg: LlmeshConfig, descriptor_path: str | Path) -> EdgeSettings:
        """Settings for the Envoy in front of the services `cfg` describes."""
        server = cfg.server
        return cls(
            listen_host=server.public_host or server.host,
            listen_port=server.envoy_port,
            admin_port=server.envoy_admin_port,
            worker_threads=server.envoy_worker_threads,
            max_request_bytes=server.max_request_bytes,
            descriptor_path=str(descriptor_path),
            picker_timeout_s=cfg.scheduler.max_queue_wait_seconds + 5.0,
            auth_enabled=cfg.auth.enabled,
            registry=cfg.address_of("registry"),
            auth=cfg.address_of("auth"),
            scheduler=cfg.address_of("scheduler"),
            otlp_endpoint=collector_address(cfg.monitoring.otlp_endpoint),
            upstream_tls_dir=edge_tls_dir(cfg),
        )
