"""Domain errors. Domain code raises these; one interceptor maps them to gRPC status codes."""

from __future__ import annotations


class LlmeshError(Exception):
    """Base of every domain error: a message that says what was wrong and what to do."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequest(LlmeshError):
    """The caller sent something malformed or out of range."""


class NotFound(LlmeshError):
    """The named thing (model, key, worker, ...) does not exist."""


class Unauthenticated(LlmeshError):
    """No credentials, or credentials that do not verify."""


class Forbidden(LlmeshError):
    """Authenticated, but not allowed to do this."""


class OverCapacity(LlmeshError):
    """A quota, rate limit or queue is full; retry later (see retry_after_s)."""


class DependencyDown(LlmeshError):
    """A service or engine this one needs is not reachable or not ready."""


Unavailable = DependencyDown


class DeadlineExceeded(LlmeshError):
    """The request ran out of time."""


class Conflict(LlmeshError):
    """The request conflicts with the current state (already exists, version mismatch)."""


class Aborted(LlmeshError):
    """A concurrent change won (optimistic concurrency): read the current state and retry."""


class FailedPrecondition(LlmeshError):
    """The system is not in a state that allows this (e.g. a lifecycle step out of order)."""


class NotImplementedYet(LlmeshError):
    """The feature is part of the contract but not built yet."""
