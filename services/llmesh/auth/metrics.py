"""AuthService's metrics: admission denials by reason (no user or key label: cardinality)."""

from __future__ import annotations

from prometheus_client import Counter

from llmesh.auth.limiter import LimitExceeded
from llmesh.common.errors import (
    DependencyDown,
    Forbidden,
    InvalidRequest,
    LlmeshError,
    NotFound,
    OverCapacity,
    Unauthenticated,
)
from llmesh.common.metrics import REGISTRY

ADMISSION_DENIALS = Counter(
    "llmesh_auth_denials",
    "Requests the edge's ext_authz check refused, by reason: unauthenticated, forbidden, "
    "invalid_request, rate limits (rpm, tpm, budget, parallel, credits), over_capacity, "
    "unavailable (a dependency is down), internal.",
    ("reason",),
    registry=REGISTRY,
)

_REASONS: list[tuple[type[LlmeshError], str]] = [
    (Unauthenticated, "unauthenticated"),
    (Forbidden, "forbidden"),
    (InvalidRequest, "invalid_request"),
    (NotFound, "not_found"),
    (OverCapacity, "over_capacity"),
    (DependencyDown, "unavailable"),
]


def denial_reason(error: LlmeshError | None) -> str:
    """The `reason` label for a denial (None: a bug denied it)."""
    if isinstance(error, LimitExceeded):
        return error.limit
    for cls, reason in _REASONS:
        if isinstance(error, cls):
            return reason
    return "internal"


def count_denial(error: LlmeshError | None) -> None:
    """One denied request."""
    ADMISSION_DENIALS.labels(denial_reason(error)).inc()


# Every reason reads 0 from the start, so rate() and alerts see the series before the first denial.
for _reason in ("unauthenticated", "forbidden", "invalid_request", "over_capacity", "unavailable", "internal",
                "rpm", "tpm", "budget", "parallel", "credits"):  # fmt: skip
    ADMISSION_DENIALS.labels(_reason)
