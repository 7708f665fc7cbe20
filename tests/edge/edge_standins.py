"""Small real gRPC servers standing in for llmesh's control-plane services behind the edge in tests.

Each serves the stock health service (SERVING for its services) and answers every method of its
services: by default with UNIMPLEMENTED and a message naming the stand-in and the exact gRPC
method it received, so a test sees where Envoy routed a request. Request metadata steers the
answer:
- `x-test-code: NOT_FOUND` (any status name): fail with that status;
- `x-test-retry-after-ms: 1500`: add that trailing metadata, as services do on RESOURCE_EXHAUSTED.
The registry stand-in also serves ModelService's catalog reads for real (a fake model "tiny"), and
reflection, as the real registry does. Inference never reaches a stand-in: the edge sends it to
workers through the endpoint picker (tests of that run the real stack, tests/scripted_stack.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from llmesh.edge.settings import CATALOG_CLUSTER, GRPC_SERVICE_OF, MODEL_SERVICE
from llmesh.model.v1 import model_service_pb2 as pb

MODEL = "tiny"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


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
    services: tuple[str, ...]
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
        for service in self.services:
            await self.health.set(service, status)
        await self.health.set("", status)

    async def stop(self) -> None:
        await self.server.stop(grace=None)


Behavior = Callable[[Any, aio.ServicerContext], Any]


class _Handler(grpc.GenericRpcHandler):
    def __init__(
        self, standin_name: str, services: tuple[str, ...], behaviors: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._name, self._services, self._behaviors = standin_name, services, behaviors
        self.calls: list[tuple[str, str]] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.rsplit("/", 1)[0].lstrip("/") not in self._services:
            return None
        request_id = dict(handler_call_details.invocation_metadata or ()).get("x-request-id", "")
        self.calls.append((method, str(request_id)))
        known = self._behaviors.get(method)
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
    await _steer(context, "stand-in registry")
    card = pb.ModelCard(id=MODEL, object="model", created=_now(), owned_by="llmesh", max_model_len=2048)
    return pb.ListModelsResponse(object="list", data=[card])


async def _get_model(request: pb.GetModelRequest, context: aio.ServicerContext) -> pb.GetModelResponse:
    await _steer(context, "stand-in registry")
    failure = _check_model(request.model)
    if failure is not None:
        await context.abort(*failure)
    return pb.GetModelResponse(id=MODEL, object="model", created=_now(), owned_by="llmesh")


def _check_model(model: str) -> tuple[grpc.StatusCode, str] | None:
    if model == MODEL:
        return None
    return grpc.StatusCode.NOT_FOUND, f"model {model!r} not found; GET /v1/models lists the models"


def catalog_behaviors() -> dict[str, grpc.RpcMethodHandler]:
    """ModelService's catalog reads, by gRPC path, as the registry serves them."""
    return {
        f"/{MODEL_SERVICE}/ListModels": grpc.unary_unary_rpc_method_handler(
            _list_models,
            request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
        f"/{MODEL_SERVICE}/GetModel": grpc.unary_unary_rpc_method_handler(
            _get_model,
            request_deserializer=pb.GetModelRequest.FromString,
            response_serializer=pb.GetModelResponse.SerializeToString,
        ),
    }


def services_of(name: str) -> tuple[str, ...]:
    """The gRPC services the control-plane upstream `name` serves (the registry: ModelService's
    catalog too)."""
    return (GRPC_SERVICE_OF[name], MODEL_SERVICE) if name == CATALOG_CLUSTER else (GRPC_SERVICE_OF[name],)


async def start_standin(name: str) -> StandIn:
    """Start a stand-in for the control-plane service `name` on a free port, SERVING."""
    services = services_of(name)
    catalog = MODEL_SERVICE in services
    # Like the real servers: accept requests up to the edge's limit (grpcio's default is 4 MiB).
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    handler = _Handler(name, services, catalog_behaviors() if catalog else {})
    server.add_generic_rpc_handlers((handler,))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if catalog:  # Envoy sends reflection to the registry
        reflection.enable_server_reflection(
            (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    standin = StandIn(
        name=name, services=services, server=server, port=port, health=health, calls=handler.calls
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
