"""The endpoint picker: SchedulerService answering Envoy's external processor API (ext_proc).

For every inference request Envoy opens one ext_proc stream and sends, in order, the request
headers, the request body (a gRPC frame, in one or more chunks; REST requests are already
transcoded) without waiting for the picker's answer to the headers, and, at the end, the response
trailers. The picker

1. once the body is complete: resolves the model, takes a lease from the pool (queueing or
   refusing as Acquire does) and answers the headers, telling Envoy where to send the request:
   `x-llmesh-destinations` lists the leased worker then fallbacks, which the workers cluster's
   override_host policy uses in order (a retry before the first byte goes to the next one). The
   same answer hands the body back (CONTINUE_AND_REPLACE), so there is one answer per request,
   not one per message;
2. on the trailers: reads the worker's usage and id;
3. when the stream ends — after the trailers, or early because the client went away or the
   upstream reset — releases the lease and reports usage, exactly once.

Tokens never pass through here: Envoy relays the worker's stream itself.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from envoy.type.v3 import http_status_pb2
from grpc import aio

from llmesh.common import headers
from llmesh.common.errors import InvalidRequest, LlmeshError, NotImplementedYet
from llmesh.common.interceptors import RETRY_AFTER_HEADER, status_for
from llmesh.scheduler.catalog import ModelCatalog
from llmesh.scheduler.picker_request import INFERENCE_METHODS, NO_BODY, read_request
from llmesh.scheduler.pool import WorkerPool
from llmesh.scheduler.records import Demand, Lease
from llmesh.scheduler.traffic import TrafficSummary
from llmesh.scheduler.usage import UsageReport
from llmesh.scheduler.usage_desk import UsageDesk
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2

log = logging.getLogger(__name__)

# Fallback workers named after the leased one, for Envoy's retries before the first byte.
MAX_FALLBACKS = 2

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# grpc-status in the worker's trailers -> how the lease ended. A refused or invalid request says
# nothing about the worker's health; only its own failures do (Envoy's outlier detection ejects).
_CALLER_STATUSES = frozenset({3, 5, 8, 9, 11})  # INVALID_ARGUMENT NOT_FOUND RESOURCE_EXHAUSTED ...
_CANCEL_STATUSES = frozenset({1, 4})  # CANCELLED, DEADLINE_EXCEEDED
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

_APPEND = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD


def _header_map(header_map: Iterable[base_pb2.HeaderValue]) -> dict[str, str]:
    # Envoy fills raw_value (bytes); older configurations sent value.
    return {h.key: h.raw_value.decode(errors="replace") if h.raw_value else h.value for h in header_map}


def _set(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode()), append_action=_APPEND
    )


def _grpc_timeout_s(value: str) -> float | None:
    """A grpc-timeout header ("250m", "5S") in seconds."""
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    if len(value) < 2 or value[-1] not in units or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * units[value[-1]]


def immediate_error(error: LlmeshError) -> ext_pb.ProcessingResponse:
    """Envoy answers the client itself with the error's status (gRPC, or HTTP via the transcoder)."""
    code = status_for(error)
    reply = ext_pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=_HTTP_STATUS.get(code, 500)),  # type: ignore[arg-type]
        grpc_status=ext_pb.GrpcStatus(status=code.value[0]),
        details=error.message,
        body=error.message.encode(),
    )
    if error.retry_after_s is not None:
        reply.headers.set_headers.append(_set(RETRY_AFTER_HEADER, str(int(error.retry_after_s * 1000))))
    return ext_pb.ProcessingResponse(immediate_response=reply)


_CONTINUE = {
    "request_headers": ext_pb.ProcessingResponse(request_headers=ext_pb.HeadersResponse()),
    "response_headers": ext_pb.ProcessingResponse(response_headers=ext_pb.HeadersResponse()),
    "request_body": ext_pb.ProcessingResponse(request_body=ext_pb.BodyResponse()),
    "response_body": ext_pb.ProcessingResponse(response_body=ext_pb.BodyResponse()),
    "request_trailers": ext_pb.ProcessingResponse(request_trailers=ext_pb.TrailersResponse()),
    "response_trailers": ext_pb.ProcessingResponse(response_trailers=ext_pb.TrailersResponse()),
}


@dataclass
class _Exchange:
    """One request's state across its ext_proc stream."""

    request_headers: dict[str, str] = field(default_factory=dict)
    # The request body's chunks as Envoy streamed them, until the last one arrived.
    body: list[bytes] = field(default_factory=list)
    trailers: dict[str, str] | None = None
    request_id: str = ""
    tenant: str = ""
    prompt_estimate: int = 0
    lease: Lease | None = None
    # The resolved model name ("" until known), and whether the picker refused the request.
    model: str = ""
    refused: bool = False


class EndpointPicker(ext_grpc.ExternalProcessorServicer):
    """Chooses the worker for each request Envoy holds, and holds its lease while it streams."""

    def __init__(
        self,
        pool: WorkerPool,
        catalog: ModelCatalog,
        usage: UsageDesk,
        *,
        max_queue_wait_s: float,
        traffic: TrafficSummary | None = None,
    ) -> None:
        self._pool = pool
        self._catalog = catalog
        self._usage = usage
        self._max_queue_wait_s = max_queue_wait_s
        self._traffic = traffic

    async def Process(
        self, request_iterator: AsyncIterator[ext_pb.ProcessingRequest], context: aio.ServicerContext
    ) -> AsyncIterator[ext_pb.ProcessingResponse]:
        """One HTTP request's ext_proc stream (see the module docstring)."""
        exchange = _Exchange()
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    exchange.request_headers = _header_map(message.request_headers.headers.headers)
                    path = exchange.request_headers.get(":path", "")
                    if path not in INFERENCE_METHODS:
                        # The edge routes nothing else through the picker: an unknown method.
                        exchange.refused = True
                        yield immediate_error(NotImplementedYet(f"{path} is not an RPC of this API"))
                        return
                    if message.request_headers.end_of_stream:
                        exchange.refused = True
                        yield immediate_error(InvalidRequest(NO_BODY))
                        return
                    # The answer to the headers waits for the body (it carries the destination).
                elif kind == "request_body":
                    exchange.body.append(message.request_body.body)
                    if not message.request_body.end_of_stream:
                        continue
                    body = b"".join(exchange.body)
                    exchange.body.clear()
                    answer = await self._pick(exchange, body)
                    yield answer
                    if answer.HasField("immediate_response"):
                        return
                elif kind == "response_trailers":
                    exchange.trailers = _header_map(message.response_trailers.trailers.headers)
                    yield _CONTINUE["response_trailers"]
                elif kind is not None:
                    yield _CONTINUE[kind]
        finally:
            self._finish(exchange)

    async def _pick(self, exchange: _Exchange, body: bytes) -> ext_pb.ProcessingResponse:
        hdrs = exchange.request_headers
        # AuthService (ext_authz, before us) mints the platform id; without auth we do. The edge
        # strips client-sent x-llmesh-* headers, so this is never a caller's value.
        exchange.request_id = hdrs.get(headers.REQUEST_ID) or uuid.uuid4().hex
        exchange.tenant = hdrs.get("x-llmesh-tenant", "")
        model_name = ""
        try:
            facts = read_request(hdrs.get(":path", ""), body, hdrs.get("grpc-encoding", ""))
            self._pool.check_synced()
            model = await self._catalog.resolve(facts.model)
            model_name = exchange.model = model.name
            demand = Demand(
                request_id=exchange.request_id,
                model=model.name,
                prompt_tokens=facts.prompt_tokens,
                max_tokens=facts.max_tokens or model.limits.max_output_tokens or model.engine.max_model_len,
                tenant=exchange.tenant,
                priority=facts.priority,
            )
            wait = self._max_queue_wait_s
            deadline = _grpc_timeout_s(hdrs.get("grpc-timeout", ""))
            if deadline is not None:
                wait = min(wait, deadline * 0.9)
            lease = await self._pool.acquire(demand, wait)
        except LlmeshError as error:
            code = status_for(error).name
            log.info("request refused", extra={"error": error.message, "code": code})
            if self._traffic is not None:
                self._traffic.unleased(model_name, code)
            exchange.refused = True
            return immediate_error(error)
        exchange.lease = lease
        exchange.prompt_estimate = facts.prompt_tokens
        destinations = [lease.worker_address, *self._pool.fallbacks(lease, MAX_FALLBACKS)]
        mutation = ext_pb.HeaderMutation(
            set_headers=[
                _set(headers.DESTINATIONS, ",".join(destinations)),
                _set(headers.REQUEST_ID, exchange.request_id),
                _set(headers.LEASE_ID, lease.lease_id),
                _set(headers.MODEL, lease.model),
            ]
        )
        # One answer for headers and body: CONTINUE_AND_REPLACE hands the body back whole (Envoy
        # drops the chunks it streamed here and sends this instead), so no answer per chunk follows
        # and the request moves on the moment this one message arrives.
        common = ext_pb.CommonResponse(
            status=ext_pb.CommonResponse.CONTINUE_AND_REPLACE,
            header_mutation=mutation,
            body_mutation=ext_pb.BodyMutation(body=body),
        )
        return ext_pb.ProcessingResponse(request_headers=ext_pb.HeadersResponse(response=common))

    def _finish(self, exchange: _Exchange) -> None:
        """Release the lease and report usage: once, whichever way the stream ended."""
        lease = exchange.lease
        if lease is None:
            if self._traffic is not None and exchange.model and not exchange.refused:
                self._traffic.unleased(exchange.model, grpc.StatusCode.CANCELLED.name)  # gone while queued
            self._report_unleased(exchange)
            return
        exchange.lease = None
        trailers = exchange.trailers
        served_by = lease.worker_id
        timing: tuple[float, float] | None = None
        if trailers is None:
            outcome, prompt, completion = "cancelled", exchange.prompt_estimate, 0
            release_outcome = scheduler_pb2.OUTCOME_CANCELLED
            status_name = grpc.StatusCode.CANCELLED.name
        else:
            prompt = _int(trailers.get(headers.PROMPT_TOKENS))
            completion = _int(trailers.get(headers.COMPLETION_TOKENS))
            served_by = trailers.get(headers.WORKER_ID) or lease.worker_id
            status = _int(trailers.get("grpc-status"))
            status_name = _STATUS_NAMES.get(status, grpc.StatusCode.UNKNOWN.name)
            if headers.TTFT_US in trailers:
                timing = (_int(trailers[headers.TTFT_US]) / 1e6, _int(trailers.get(headers.DECODE_US)) / 1e6)
            if status == 0:
                outcome, release_outcome = "success", scheduler_pb2.OUTCOME_SUCCESS
            elif status in _CALLER_STATUSES:
                outcome, release_outcome = "rejected", scheduler_pb2.OUTCOME_REJECTED
            elif status in _CANCEL_STATUSES:
                outcome, release_outcome = "cancelled", scheduler_pb2.OUTCOME_CANCELLED
            else:
                outcome, release_outcome = "worker_failed", scheduler_pb2.OUTCOME_WORKER_FAILED
        if served_by != lease.worker_id:
            # Envoy retried on a fallback: the leased worker failed before its first byte.
            release_outcome = scheduler_pb2.OUTCOME_WORKER_FAILED
        self._pool.release(lease.lease_id, release_outcome)
        report = UsageReport(
            request_id=exchange.request_id,
            model=lease.model,
            worker_id=served_by,
            prompt_tokens=prompt,
            completion_tokens=completion,
            outcome=outcome,
            tenant=exchange.tenant,
            status=status_name,
            timing_s=timing,
        )
        if trailers is None:
            self._usage.report_untrailed(lease.lease_id, report)
        else:
            self._usage.report(report)

    def _report_unleased(self, exchange: _Exchange) -> None:
        """A request AuthService admitted (it minted the id) that never got a lease: refused here,
        or gone while it queued. Reported with no tokens, so its reservation (budget, credits, a
        max_parallel slot) is settled now rather than when the reservation times out."""
        request_id = exchange.request_headers.get(headers.REQUEST_ID)
        if not request_id:
            return
        report = UsageReport(
            request_id=request_id,
            model=exchange.model,
            worker_id="",
            prompt_tokens=0,
            completion_tokens=0,
            outcome="rejected" if exchange.refused else "cancelled",
            tenant=exchange.request_headers.get("x-llmesh-tenant", ""),
        )
        self._usage.report(report)


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


__all__ = ["EndpointPicker", "immediate_error"]
