"""Small real gRPC servers standing in for the llmesh services behind the edge in tests.

Each serves the stock health service (SERVING for its service name) and answers every method of
its service: by default with UNIMPLEMENTED and a message naming the stand-in and the exact
gRPC method it received, so a test sees where Envoy routed a request. Request metadata steers
the answer:
- `x-test-code: NOT_FOUND` (any status name): fail with that status;
- `x-test-retry-after-ms: 1500`: add that trailing metadata, as the gateway does on RESOURCE_EXHAUSTED.
The gateway stand-in also implements a few ModelService RPCs for real (a fake model "tiny"), so the
OpenAI SDK can be exercised through Envoy without the real stack.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from llmesh.model.v1 import model_service_pb2 as pb

MODEL = "tiny"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
STREAM_TEXT = ("Hel", "lo", " world")


def _metadata(context: aio.ServicerContext) -> dict[str, str]:
    return {key: str(value) for key, value in (context.invocation_metadata() or ())}


async def _steer(context: aio.ServicerContext, who: str) -> None:
    """Apply the x-test-* metadata: maybe fail with the status the test asked for."""
    md = _metadata(context)
    if "x-test-retry-after-ms" in md:
        context.set_trailing_metadata((("retry-after-ms", md["x-test-retry-after-ms"]),))
    code_name = md.get("x-test-code")
    if code_name:
        await context.abort(grpc.StatusCode[code_name], f"{who} failed as asked: {code_name}")


@dataclass
class StandIn:
    """A running stand-in server."""

    name: str
    service: str
    server: aio.Server
    port: int
    health: HealthServicer
    # (method, x-request-id) of every call, newest last.
    calls: list[tuple[str, str]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(self.service, status)
        await self.health.set("", status)

    async def stop(self) -> None:
        await self.server.stop(grace=None)


Behavior = Callable[[Any, aio.ServicerContext], Any]


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, standin_name: str, service: str, behaviors: dict[str, grpc.RpcMethodHandler]) -> None:
        self._name, self._service, self._behaviors = standin_name, service, behaviors
        self.calls: list[tuple[str, str]] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if not method.startswith(f"/{self._service}/"):
            return None
        request_id = dict(handler_call_details.invocation_metadata or ()).get("x-request-id", "")
        self.calls.append((method, str(request_id)))
        known = self._behaviors.get(method.rsplit("/", 1)[1])
        if known is not None:
            return known

        async def unimplemented(request: bytes, context: aio.ServicerContext) -> bytes:
            who = f"stand-in {self._name}"
            await _steer(context, who)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{who} got {method}")
            return b""

        return grpc.unary_unary_rpc_method_handler(unimplemented)


def _now() -> int:
    return int(time.time())


async def _list_models(request: pb.ListModelsRequest, context: aio.ServicerContext) -> pb.ListModelsResponse:
    await _steer(context, "gateway")
    card = pb.ModelCard(id=MODEL, object="model", created=_now(), owned_by="llmesh", max_model_len=2048)
    return pb.ListModelsResponse(object="list", data=[card])


async def _get_model(request: pb.GetModelRequest, context: aio.ServicerContext) -> pb.GetModelResponse:
    await _steer(context, "gateway")
    failure = _check_model(request.model)
    if failure is not None:
        await context.abort(*failure)
    return pb.GetModelResponse(id=MODEL, object="model", created=_now(), owned_by="llmesh")


def _check_model(model: str) -> tuple[grpc.StatusCode, str] | None:
    if model == MODEL:
        return None
    if model == "busy":
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "no capacity for model busy; retry later"
    return grpc.StatusCode.NOT_FOUND, f"model {model!r} not found; GET /v1/models lists the models"


async def _chat(
    request: pb.CreateChatCompletionRequest, context: aio.ServicerContext
) -> pb.CreateChatCompletionResponse:
    await _steer(context, "gateway")
    failure = _check_model(request.model)
    if failure is not None:
        if failure[0] == grpc.StatusCode.RESOURCE_EXHAUSTED:
            context.set_trailing_metadata((("retry-after-ms", "2000"),))
        await context.abort(*failure)
    text = "".join(STREAM_TEXT)
    return pb.CreateChatCompletionResponse(
        id="chatcmpl-standin",
        object="chat.completion",
        created=_now(),
        model=MODEL,
        choices=[
            pb.ChatCompletionChoice(
                index=0,
                message=pb.ChatCompletionMessage(role="assistant", content=text),
                finish_reason="stop",
            )
        ],
        usage=pb.Usage(prompt_tokens=3, completion_tokens=3, total_tokens=6),
    )


async def _stream_chat(
    request: pb.CreateChatCompletionRequest, context: aio.ServicerContext
) -> AsyncIterator[pb.StreamChatCompletionResponse]:
    await _steer(context, "gateway")
    failing = request.model == "fail-mid-stream"
    failure = None if failing else _check_model(request.model)
    if failure is not None:
        await context.abort(*failure)

    def chunk(**kwargs: Any) -> pb.StreamChatCompletionResponse:
        return pb.StreamChatCompletionResponse(
            id="chatcmpl-standin",
            object="chat.completion.chunk",
            created=_now(),
            model=request.model,
            **kwargs,
        )

    for i, piece in enumerate(STREAM_TEXT):
        delta = pb.ChatCompletionDelta(content=piece, role="assistant" if i == 0 else None)
        yield chunk(choices=[pb.ChatCompletionChunkChoice(index=0, delta=delta)])
        await asyncio.sleep(0.01)
        if failing and i == 1:
            yield chunk(
                error=pb.StreamError(
                    message="worker worker-0 failed mid-stream", type="server_error", code="UNAVAILABLE"
                )
            )
            return
    yield chunk(
        choices=[pb.ChatCompletionChunkChoice(index=0, delta=pb.ChatCompletionDelta(), finish_reason="stop")]
    )
    if request.stream_options.include_usage:
        yield chunk(usage=pb.Usage(prompt_tokens=3, completion_tokens=3, total_tokens=6))


def _gateway_behaviors() -> dict[str, grpc.RpcMethodHandler]:
    return {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            _list_models,
            request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
        "GetModel": grpc.unary_unary_rpc_method_handler(
            _get_model,
            request_deserializer=pb.GetModelRequest.FromString,
            response_serializer=pb.GetModelResponse.SerializeToString,
        ),
        "CreateChatCompletion": grpc.unary_unary_rpc_method_handler(
            _chat,
            request_deserializer=pb.CreateChatCompletionRequest.FromString,
            response_serializer=pb.CreateChatCompletionResponse.SerializeToString,
        ),
        "StreamChatCompletion": grpc.unary_stream_rpc_method_handler(
            _stream_chat,
            request_deserializer=pb.CreateChatCompletionRequest.FromString,
            response_serializer=pb.StreamChatCompletionResponse.SerializeToString,
        ),
    }


async def start_standin(name: str, service: str, *, gateway: bool = False) -> StandIn:
    """Start a stand-in for `service` on a free port, SERVING."""
    # Like the real servers: accept requests up to the edge's limit (grpcio's default is 4 MiB).
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    handler = _Handler(name, service, _gateway_behaviors() if gateway else {})
    server.add_generic_rpc_handlers((handler,))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if gateway:
        reflection.enable_server_reflection(
            (service, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    standin = StandIn(
        name=name, service=service, server=server, port=port, health=health, calls=handler.calls
    )
    await standin.set_serving(True)
    return standin


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll an async predicate until it holds."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(0.1)
