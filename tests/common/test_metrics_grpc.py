"""gRPC metrics on real servers: every RPC counted by method and final status, streams when they end,
client calls through llmesh's channel factory, and the `/metrics` side port serving them."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from grpc import aio

from llmesh.common import errors
from llmesh.common.channels import service_channel
from llmesh.common.metrics import REGISTRY, start_metrics_endpoint
from llmesh.common.server import start_server
from llmesh.registry.v1 import registry_service_pb2 as pb
from llmesh.registry.v1 import registry_service_pb2_grpc as pb_grpc

SERVICE = "llmesh.registry.v1.RegistryService"


class Double(pb_grpc.RegistryServiceServicer):
    """GetModel fails as the request's name says; WatchWorkers streams one event, then ends as
    its `model` says (end, fail, hang until cancelled)."""

    def __init__(self) -> None:
        self.hanging = asyncio.Event()

    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext
    ) -> pb.GetModelResponse:
        if request.name == "ok":
            return pb.GetModelResponse(model=pb.Model(name="ok"))
        if request.name == "bug":
            raise KeyError("boom")
        if request.name == "abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "aborted by the handler")
        raise getattr(errors, request.name)(f"{request.name} happened")

    async def WatchWorkers(self, request: pb.WatchWorkersRequest, context: aio.ServicerContext):
        yield pb.WatchWorkersResponse(type=pb.WORKER_EVENT_TYPE_SNAPSHOT_END)
        if request.model == "fail":
            raise errors.DependencyDown("registry lost its database")
        if request.model == "hang":
            self.hanging.set()
            await asyncio.sleep(3600)


@pytest.fixture
async def served():
    double = Double()

    def add(s: aio.Server) -> list[str]:
        pb_grpc.add_RegistryServiceServicer_to_server(double, s)
        return [SERVICE]

    running = await start_server("metrics-test", "127.0.0.1:0", add)
    channel = aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield double, running, channel
    await channel.close(None)
    await running.stop(0)


def handled(method: str, code: str, kind: str, side: str = "server") -> float:
    labels = {"grpc_type": kind, "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}
    return REGISTRY.get_sample_value(f"grpc_{side}_handled_total", labels) or 0.0


def latency_count(method: str, kind: str, side: str = "server") -> float:
    labels = {"grpc_type": kind, "grpc_service": SERVICE, "grpc_method": method}
    return REGISTRY.get_sample_value(f"grpc_{side}_handling_seconds_count", labels) or 0.0


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("ok", "OK"),
        ("InvalidRequest", "INVALID_ARGUMENT"),
        ("NotFound", "NOT_FOUND"),
        ("OverCapacity", "RESOURCE_EXHAUSTED"),
        ("bug", "INTERNAL"),
        ("abort", "PERMISSION_DENIED"),
    ],
)
async def test_unary_rpcs_are_counted_by_their_final_status(served, name: str, code: str) -> None:
    _, _, channel = served
    stub = pb_grpc.RegistryServiceStub(channel)
    before, timed = handled("GetModel", code, "unary"), latency_count("GetModel", "unary")
    started = REGISTRY.get_sample_value(
        "grpc_server_started_total",
        {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "GetModel"},
    )
    try:
        await stub.GetModel(pb.GetModelRequest(name=name))
        got = "OK"
    except aio.AioRpcError as e:
        got = e.code().name
    assert got == code
    # The server counts after its handler has answered, so the client can see the status first.
    await until(lambda: handled("GetModel", code, "unary") == before + 1)
    assert latency_count("GetModel", "unary") == timed + 1
    assert (
        REGISTRY.get_sample_value(
            "grpc_server_started_total",
            {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "GetModel"},
        )
        == (started or 0) + 1
    )


async def test_a_stream_counts_once_when_it_ends_with_its_final_status(served) -> None:
    _, _, channel = served
    stub = pb_grpc.RegistryServiceStub(channel)
    ok, unavailable = (
        handled("WatchWorkers", "OK", "server_stream"),
        handled("WatchWorkers", "UNAVAILABLE", "server_stream"),
    )
    events = [e async for e in stub.WatchWorkers(pb.WatchWorkersRequest(model="end"))]
    assert len(events) == 1
    await until(lambda: handled("WatchWorkers", "OK", "server_stream") == ok + 1)

    call = stub.WatchWorkers(pb.WatchWorkersRequest(model="fail"))
    with pytest.raises(aio.AioRpcError) as failed:
        async for _ in call:
            pass
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    await until(lambda: handled("WatchWorkers", "UNAVAILABLE", "server_stream") == unavailable + 1)
    assert handled("WatchWorkers", "OK", "server_stream") == ok + 1


async def test_a_stream_the_client_cancels_counts_as_cancelled(served) -> None:
    double, _, channel = served
    stub = pb_grpc.RegistryServiceStub(channel)
    codes = [c.name for c in grpc.StatusCode]
    ended = {code: handled("WatchWorkers", code, "server_stream") for code in codes}
    call = stub.WatchWorkers(pb.WatchWorkersRequest(model="hang"))
    await call.read()
    await asyncio.wait_for(double.hanging.wait(), 5)
    # Open after its first message: started, not yet counted under any status.
    assert {code: handled("WatchWorkers", code, "server_stream") for code in codes} == ended
    cancelled = ended["CANCELLED"]
    call.cancel()
    await until(lambda: handled("WatchWorkers", "CANCELLED", "server_stream") == cancelled + 1)


async def test_client_calls_through_the_channel_factory_are_counted(served) -> None:
    _, running, _ = served
    channel = service_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.RegistryServiceStub(channel)
    ok, missing = (
        handled("GetModel", "OK", "unary", "client"),
        handled("GetModel", "NOT_FOUND", "unary", "client"),
    )
    await stub.GetModel(pb.GetModelRequest(name="ok"))
    with pytest.raises(aio.AioRpcError):
        await stub.GetModel(pb.GetModelRequest(name="NotFound"))
    await until(lambda: handled("GetModel", "NOT_FOUND", "unary", "client") == missing + 1)
    assert handled("GetModel", "OK", "unary", "client") == ok + 1
    assert latency_count("GetModel", "unary", "client") >= 2
    await channel.close(None)


async def test_the_side_port_serves_the_counters_in_prometheus_text(served) -> None:
    _, _, channel = served
    await pb_grpc.RegistryServiceStub(channel).GetModel(pb.GetModelRequest(name="ok"))
    endpoint = start_metrics_endpoint("127.0.0.1:0")
    try:
        assert endpoint.port > 0
        async with httpx.AsyncClient() as http:
            response = await http.get(endpoint.url)
        assert response.status_code == 200
        expected = handled("GetModel", "OK", "unary")
        line = (
            f'grpc_server_handled_total{{grpc_code="OK",grpc_method="GetModel",'
            f'grpc_service="{SERVICE}",grpc_type="unary"}} {expected}'
        )
        assert line in response.text
        assert "process_cpu_seconds_total" in response.text
    finally:
        endpoint.close()


async def test_client_streams_through_the_channel_factory_count_when_they_end(served) -> None:
    """Server-streaming calls (the registry watch's shape) on the client side: counted once when
    they end, by final status, whether read with `async for` or `read()`, or cancelled."""
    double, running, _ = served
    channel = service_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.RegistryServiceStub(channel)
    codes = [c.name for c in grpc.StatusCode]

    def ended() -> dict[str, float]:
        return {code: handled("WatchWorkers", code, "server_stream", "client") for code in codes}

    def started() -> float:
        labels = {"grpc_type": "server_stream", "grpc_service": SERVICE, "grpc_method": "WatchWorkers"}
        return REGISTRY.get_sample_value("grpc_client_started_total", labels) or 0.0

    before, began = ended(), started()
    events = [e async for e in stub.WatchWorkers(pb.WatchWorkersRequest(model="end"))]
    assert len(events) == 1
    await until(lambda: ended()["OK"] == before["OK"] + 1)

    call = stub.WatchWorkers(pb.WatchWorkersRequest(model="fail"))
    assert (await call.read()).type == pb.WORKER_EVENT_TYPE_SNAPSHOT_END
    with pytest.raises(aio.AioRpcError) as failed:
        await call.read()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    await until(lambda: ended()["UNAVAILABLE"] == before["UNAVAILABLE"] + 1)

    call = stub.WatchWorkers(pb.WatchWorkersRequest(model="hang"))
    await call.read()
    await asyncio.wait_for(double.hanging.wait(), 5)
    assert ended()["CANCELLED"] == before["CANCELLED"]  # open: started, not yet ended
    call.cancel()
    await until(lambda: ended()["CANCELLED"] == before["CANCELLED"] + 1)

    after = ended()
    assert {c: after[c] - before[c] for c in codes if after[c] != before[c]} == {
        "OK": 1,
        "UNAVAILABLE": 1,
        "CANCELLED": 1,
    }
    assert started() == began + 3
    assert latency_count("WatchWorkers", "server_stream", "client") >= 3
    await channel.close(None)


ECHO = "/llmesh.test.Echo/Chat"


async def test_bidi_client_streams_are_counted_and_keep_write_and_read() -> None:
    """A bidirectional stream through the channel factory: write()/done_writing()/read() work as on
    a plain channel, and the call counts once with its final status."""

    async def chat(requests, context: aio.ServicerContext):
        async for request in requests:
            if request == b"fail":
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "told to fail")
            yield request.upper()

    server = aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "llmesh.test.Echo", {"Chat": grpc.stream_stream_rpc_method_handler(chat)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = service_channel(f"127.0.0.1:{port}")

    def count(code: str) -> float:
        labels = {"grpc_type": "bidi_stream", "grpc_service": "llmesh.test.Echo", "grpc_method": "Chat"}
        return REGISTRY.get_sample_value("grpc_client_handled_total", {**labels, "grpc_code": code}) or 0.0

    ok, failed = count("OK"), count("FAILED_PRECONDITION")
    try:
        call = channel.stream_stream(ECHO)()
        await call.write(b"hi")
        assert await call.read() == b"HI"
        await call.done_writing()
        assert await call.read() is aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        await until(lambda: count("OK") == ok + 1)

        replies = [r async for r in channel.stream_stream(ECHO)(iter([b"a", b"b"]))]
        assert replies == [b"A", b"B"]
        await until(lambda: count("OK") == ok + 2)

        call = channel.stream_stream(ECHO)(iter([b"fail"]))
        with pytest.raises(aio.AioRpcError) as error:
            await call.read()
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await until(lambda: count("FAILED_PRECONDITION") == failed + 1)
        assert count("OK") == ok + 2
    finally:
        await channel.close(None)
        await server.stop(None)
