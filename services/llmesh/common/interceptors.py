"""Server interceptors: request ids, and the one place domain errors become status codes."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from llmesh.common.errors import (
    Aborted,
    Conflict,
    DeadlineExceeded,
    DependencyDown,
    FailedPrecondition,
    Forbidden,
    InvalidRequest,
    LlmeshError,
    NotFound,
    NotImplementedYet,
    OverCapacity,
    Unauthenticated,
)
from llmesh.common.handlers import with_behavior
from llmesh.common.logs import request_id_var

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
RETRY_AFTER_HEADER = "retry-after-ms"

STATUS_FOR: dict[type[LlmeshError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    OverCapacity: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DependencyDown: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    Aborted: grpc.StatusCode.ABORTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NotImplementedYet: grpc.StatusCode.UNIMPLEMENTED,
}


def status_for(error: LlmeshError) -> grpc.StatusCode:
    """The status code for a domain error (walking its base classes)."""
    for cls in type(error).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]
    return grpc.StatusCode.INTERNAL


def incoming_request_id(context: aio.ServicerContext) -> str:
    """The caller's x-request-id, or a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return uuid.uuid4().hex


async def _abort_for(error: BaseException, context: aio.ServicerContext, method: str) -> None:
    if isinstance(error, LlmeshError):
        code = status_for(error)
        if error.retry_after_s is not None:
            context.set_trailing_metadata(((RETRY_AFTER_HEADER, str(int(error.retry_after_s * 1000))),))
        log.info("rpc failed", extra={"method": method, "code": code.name, "error": error.message})
        await context.abort(code, error.message)
    if isinstance(error, NotImplementedError):
        # The generated servicer base raises this for RPCs that are in the contract but not built.
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{method} is part of the v1 contract but not implemented yet"
        )
    log.exception("bug while serving %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__}")


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: aio.ServicerContext) -> Any:
        token = request_id_var.set(incoming_request_id(context))
        try:
            return await behavior(request, context)
        except (LlmeshError, Exception) as error:
            if isinstance(error, aio.AbortError):
                raise
            await _abort_for(error, context, method)
        finally:
            request_id_var.reset(token)

    return handler


def _wrap_stream(
    behavior: Callable[..., AsyncGenerator[Any, None]], method: str
) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        token = request_id_var.set(incoming_request_id(context))
        try:
            # aclosing: a cancelled RPC must close the inner stream now (aborting engine work),
            # not whenever the garbage collector gets to it.
            async with contextlib.aclosing(behavior(request, context)) as stream:
                async for item in stream:
                    yield item
        except (LlmeshError, Exception) as error:
            if isinstance(error, aio.AbortError):
                raise
            await _abort_for(error, context, method)
        finally:
            # A stream closed by cancellation is finalized from another context, where the token
            # cannot be reset; the RPC's own context ends with it anyway.
            with contextlib.suppress(ValueError):
                request_id_var.reset(token)

    return handler


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Sets the request id for logs and turns domain errors into the right status code."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        if handler.unary_unary is not None:
            return with_behavior(handler, "unary_unary", _wrap_unary(handler.unary_unary, method))
        if handler.unary_stream is not None:
            return with_behavior(handler, "unary_stream", _wrap_stream(handler.unary_stream, method))  # type: ignore[arg-type]
        return handler
