"""What one request used, as the picker learns it from the worker's trailers at the stream's end."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc import aio

from llmesh.auth.v1 import auth_service_pb2 as auth_pb
from llmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from llmesh.common.channels import service_channel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageReport:
    """One finished request. `outcome`: success, rejected, cancelled or worker_failed; `status`: the
    final gRPC status name; `timing_s`: the worker's (time to first token, first to last token)."""

    request_id: str
    model: str
    worker_id: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str
    tenant: str = ""
    status: str = ""
    timing_s: tuple[float, float] | None = None


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


class AuthUsageSink:
    """Hands each report to AuthService.RecordUsage: the ledger row and the settlement of the
    request's reservation. Off the picker's path (a task per report), retried with the same request
    id until it lands — RecordUsage is idempotent per request id, so a retry never charges twice."""

    def __init__(self, auth_address: str, *, retry_for_s: float = 600.0) -> None:
        self._channel = service_channel(auth_address, "auth")
        self._stub = auth_grpc.AuthServiceStub(self._channel)
        self._retry_for_s = retry_for_s
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, report: UsageReport) -> None:
        task = asyncio.get_running_loop().create_task(self._send(report))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, report: UsageReport) -> None:
        request = auth_pb.RecordUsageRequest(
            request_id=report.request_id,
            model=report.model,
            prompt_tokens=report.prompt_tokens,
            completion_tokens=report.completion_tokens,
            outcome=report.outcome,
            worker_id=report.worker_id,
        )
        loop = asyncio.get_running_loop()
        give_up_at, backoff = loop.time() + self._retry_for_s, 0.1
        while True:
            try:
                await self._stub.RecordUsage(request, timeout=5.0)
                return
            except aio.AioRpcError as error:
                if error.code() in _PERMANENT or loop.time() > give_up_at:
                    log.error(
                        "usage of %s not recorded: %s",
                        report.request_id,
                        error.details(),
                        extra={"code": error.code().name},
                    )
                    return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def close(self, grace_s: float = 5.0) -> None:
        """Give pending reports `grace_s` to land, then stop."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        await self._channel.close(None)


_PERMANENT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED})
