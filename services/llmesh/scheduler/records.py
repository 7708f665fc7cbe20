"""The scheduler's value records: a worker as membership describes it and as the pool tracks it,
what an Acquire asks for, and the lease it gets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Concurrent leases for a worker that registered without a capacity.
DEFAULT_CAPACITY = 16


@dataclass(frozen=True)
class WorkerSpec:
    """A worker as membership describes it (from the registry watch)."""

    worker_id: str
    address: str
    models: frozenset[str]
    capacity: int = 0
    cordoned: bool = False  # cordoned or draining: no new leases
    # The catalog version of each model the worker serves ({} when it did not say).
    model_versions: Mapping[str, str] = field(default_factory=dict)
    running_requests: int = 0
    waiting_requests: int = 0
    kv_cache_usage: float = 0.0


@dataclass
class PoolWorker:
    """A routable worker with the load our own leases put on it."""

    worker_id: str
    address: str
    models: frozenset[str]
    capacity: int
    model_versions: Mapping[str, str] = field(default_factory=dict)
    cordoned: bool = False
    running_requests: int = 0
    waiting_requests: int = 0
    kv_cache_usage: float = 0.0
    active: int = 0
    outstanding_tokens: int = 0
    ejected_until: float = 0.0


@dataclass(frozen=True)
class Demand:
    """What an Acquire asks for."""

    request_id: str
    model: str
    prompt_tokens: int = 0
    max_tokens: int = 0
    tenant: str = ""
    priority: int = 0
    exclude_workers: frozenset[str] = frozenset()
    # Only workers serving this catalog version of the model (a traffic split's choice); "" = any.
    version: str = ""

    @property
    def tokens(self) -> int:
        """The most work the request can be: prompt plus the output bound."""
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class Lease:
    """A granted lease: the caller streams from `worker_address` and releases `lease_id` after."""

    lease_id: str
    worker_id: str
    worker_address: str
    model: str
    request_id: str
    tokens: int
    acquired_at: float
    queued_ms: int = 0
