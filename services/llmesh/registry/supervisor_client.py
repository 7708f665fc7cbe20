"""The registry's client of SupervisorService (`llmesh up`'s process supervisor).

The supervisor's refusals keep their meaning (NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT and
its message); a supervisor that does not answer is UNAVAILABLE naming its address.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from grpc import aio

from llmesh.common.errors import DependencyDown, FailedPrecondition, InvalidRequest, LlmeshError, NotFound
from llmesh.registry.v1 import supervisor_service_pb2 as pb
from llmesh.registry.v1 import supervisor_service_pb2_grpc as pb_grpc

# Each call only launches or signals a process, so it answers fast when the supervisor is alive.
CALL_TIMEOUT_S = 10.0

_ERROR_FOR: dict[grpc.StatusCode, type[LlmeshError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
}


class SupervisorClient:
    """Starts and stops worker processes through the supervisor at `address`."""

    def __init__(self, address: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._channel = aio.insecure_channel(address)
        self._stub = pb_grpc.SupervisorServiceStub(self._channel)

    async def start_worker(self, model: str, labels: Mapping[str, str]) -> str:
        """Launch a worker for `model`; the id it will register with."""
        try:
            reply = await self._stub.StartWorker(
                pb.StartWorkerRequest(model=model, labels=dict(labels)), timeout=self._timeout_s
            )
        except aio.AioRpcError as error:
            raise self._error(error) from None
        return reply.worker_id

    async def stop_worker(self, worker_id: str, model: str, drain_timeout_s: int) -> str:
        """Signal a worker to drain and exit; the model it serves."""
        try:
            reply = await self._stub.StopWorker(
                pb.StopWorkerRequest(worker_id=worker_id, model=model, drain_timeout_seconds=drain_timeout_s),
                timeout=self._timeout_s,
            )
        except aio.AioRpcError as error:
            raise self._error(error) from None
        return reply.model

    def _error(self, error: aio.AioRpcError) -> LlmeshError:
        kind = _ERROR_FOR.get(error.code())
        if kind is not None:
            return kind(error.details() or "")
        return DependencyDown(
            f"the worker supervisor at {self.address} (registry.supervisor_address) did not answer "
            f"({error.code().name}: {error.details()}); is llmesh up still running?"
        )

    async def close(self) -> None:
        await self._channel.close(None)
