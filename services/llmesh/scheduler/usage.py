"""What one request used, as the picker learns it from the worker's trailers at the stream's end."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageReport:
    """One finished request. `outcome`: success, rejected, cancelled or worker_failed."""

    request_id: str
    model: str
    worker_id: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str
    tenant: str = ""


class UsageSink(Protocol):
    """Where the picker hands each request's usage, exactly once per request id."""

    def record(self, report: UsageReport) -> None: ...


class LogUsageSink:
    """Writes each report as one structured log line (accounting until AuthService's ledger)."""

    def record(self, report: UsageReport) -> None:
        log.info(
            "request finished",
            extra={
                "platform_request_id": report.request_id,
                "model": report.model,
                "worker_id": report.worker_id,
                "prompt_tokens": report.prompt_tokens,
                "completion_tokens": report.completion_tokens,
                "outcome": report.outcome,
            },
        )
