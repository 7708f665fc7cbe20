"""The shared server bootstrap: health lifecycle, reflection, error mapping, request ids."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common import errors
from llmesh.common.logs import request_id_var
from llmesh.common.server import start_server
from llmesh.registry.v1 import registry_service_pb2 as pb
from llmesh.registry.v1 import registry_service_pb2_grpc as pb_grpc

SERVICE = "llmesh.registry.v1.RegistryService"


class RaisingRegistry(pb_grpc.RegistryServiceServicer):
    """A servicer double whose GetModel raises whatever the test names in the request."""

    seen_request_ids: list[str] = []

    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext
    ) -> pb.GetModelResponse:
        self.seen_request_ids.append(request_id_var.get())
        kind = request.name
        if kind == "ok":
            return pb.GetModelResponse(model=pb.Model(name="ok"))
        if kind == "bug":
            raise KeyError("boom")
        error_type = getattr(errors, kind)
        raise error_type(
            f"{kind} happened; do the thing", retry_after_s=1.5 if kind == "OverCapacity" else None
        )

    async def WatchWorkers(self, request: pb.WatchWorkersRequest, context: aio.ServicerContext):
        yield pb.WatchWorkersResponse(type=pb.WORKER_EVENT_TYPE_SNAPSHOT_END)
        raise errors.DependencyDown("registry lost its database")


@pytest.fixture
async def server():
    def add(s: aio.Server) -> list[str]:
        pb_grpc.add_RegistryServiceServicer_to_server(RaisingRegistry(), s)
        return [SERVICE]

    running = await start_server("test", "127.0.0.1:0", add)
    channel = aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel
    await channel.close()
    await running.stop(0)


async def health_of(channel: aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_is_not_serving_until_ready_and_after_stop(server) -> None:
    running, channel = server
    assert await health_of(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.set_serving(True)
    assert await health_of(channel) == health_pb2.HealthCheckResponse.SERVING
    assert await health_of(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    order: list[str] = []

    async def before() -> None:
        order.append(f"before:{await health_of(channel)}")

    async def after() -> None:
        order.append("after")

    running.on_shutdown.append(before)
    running.after_stop.append(after)
    await running.stop(0.5)
    assert order == [f"before:{health_pb2.HealthCheckResponse.NOT_SERVING}", "after"]
    await running.stop(0.5)  # idempotent


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("InvalidRequest", grpc.StatusCode.INVALID_ARGUMENT),
        ("NotFound", grpc.StatusCode.NOT_FOUND),
        ("Unauthenticated", grpc.StatusCode.UNAUTHENTICATED),
        ("Forbidden", grpc.StatusCode.PERMISSION_DENIED),
        ("OverCapacity", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("DependencyDown", grpc.StatusCode.UNAVAILABLE),
        ("DeadlineExceeded", grpc.StatusCode.DEADLINE_EXCEEDED),
        ("Conflict", grpc.StatusCode.ALREADY_EXISTS),
        ("bug", grpc.StatusCode.INTERNAL),
    ],
)
async def test_domain_errors_map_to_status_codes(server, kind: str, code: grpc.StatusCode) -> None:
    _, channel = server
    with pytest.raises(aio.AioRpcError) as info:
        await pb_grpc.RegistryServiceStub(channel).GetModel(pb.GetModelRequest(name=kind))
    assert info.value.code() == code
    if kind == "bug":
        assert "KeyError" in (info.value.details() or "") and "boom" not in (info.value.details() or "")
    else:
        assert "do the thing" in (info.value.details() or "")
    if kind == "OverCapacity":
        assert ("retry-after-ms", "1500") in tuple(info.value.trailing_metadata() or ())


async def test_stream_errors_and_unimplemented_rpcs(server) -> None:
    _, channel = server
    stub = pb_grpc.RegistryServiceStub(channel)
    call = stub.WatchWorkers(pb.WatchWorkersRequest())
    first = await call.read()
    assert first.type == pb.WORKER_EVENT_TYPE_SNAPSHOT_END
    with pytest.raises(aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(aio.AioRpcError) as info:
        await stub.ListWorkers(pb.ListWorkersRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "not implemented yet" in (info.value.details() or "")


async def test_request_id_comes_from_metadata_or_is_generated(server) -> None:
    _, channel = server
    stub = pb_grpc.RegistryServiceStub(channel)
    RaisingRegistry.seen_request_ids.clear()
    await stub.GetModel(pb.GetModelRequest(name="ok"), metadata=(("x-request-id", "req-123"),))
    await stub.GetModel(pb.GetModelRequest(name="ok"))
    assert RaisingRegistry.seen_request_ids[0] == "req-123"
    assert len(RaisingRegistry.seen_request_ids[1]) == 32


async def test_listen_on_a_taken_port_fails_clearly(server) -> None:
    running, _ = server
    with pytest.raises(OSError, match="address in use"):
        await start_server("dup", f"127.0.0.1:{running.port}", lambda s: [])
    await asyncio.sleep(0)
