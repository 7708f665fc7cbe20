"""StartModelInstance/StopModelInstance on an in-process registry: input checks, the admin check,
no supervisor attached, an unreachable one. (The supervisor at work: test_registry_instances_stack.)"""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest

from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

Start = registry_pb2.StartModelInstanceRequest
Stop = registry_pb2.StopModelInstanceRequest


def refused_address() -> str:
    """127.0.0.1:PORT where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def call(stub: Any, request: Start | Stop, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    if isinstance(request, Start):
        return await stub.StartModelInstance(request, metadata=metadata)
    return await stub.StopModelInstance(request, metadata=metadata)


async def expect(stub: Any, request: Start | Stop, code: grpc.StatusCode, needle: str, **kw: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(stub, request, **kw)
    assert err.value.code() == code, err.value.details()
    assert needle in (err.value.details() or ""), err.value.details()


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (Start(model="tiny"), "no supervisor attached to this registry"),
        (Stop(model="tiny", worker_id="w1"), "drain the worker with DrainWorker"),
    ],
)
async def test_without_a_supervisor_is_failed_precondition(
    make_registry: Any, request_: Start | Stop, needle: str
) -> None:
    _, stub = await make_registry()
    await expect(stub, request_, grpc.StatusCode.FAILED_PRECONDITION, needle)
    await expect(stub, request_, grpc.StatusCode.FAILED_PRECONDITION, "registry.supervisor_address is empty")


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (Start(), "model is required"),
        (Start(model="tiny", labels={"": "x"}), "labels: label key ''"),
        (Stop(worker_id="w1"), "model is required"),
        (Stop(model="tiny"), "worker_id is required"),
        (Stop(model="tiny", worker_id="w1", drain_timeout_seconds=3601), "drain_timeout_seconds is 3601"),
    ],
)
async def test_bad_input_names_the_field(make_registry: Any, request_: Start | Stop, needle: str) -> None:
    _, stub = await make_registry(supervisor_address=refused_address())
    await expect(stub, request_, grpc.StatusCode.INVALID_ARGUMENT, needle)


async def test_only_admins_start_or_stop(make_registry: Any) -> None:
    _, stub = await make_registry(supervisor_address=refused_address())
    user = (("x-llmesh-role", "user"), ("x-llmesh-user", "alice"))
    for request in (Start(model="tiny"), Stop(model="tiny", worker_id="w1")):
        await expect(stub, request, grpc.StatusCode.PERMISSION_DENIED, "needs the admin role", metadata=user)


async def test_unknown_model_and_wrong_model_for_the_worker(make_registry: Any) -> None:
    _, stub = await make_registry(supervisor_address=refused_address())
    await expect(
        stub, Start(model="nope"), grpc.StatusCode.NOT_FOUND, "model: 'nope' is not a live catalog model"
    )
    await expect(stub, Stop(model="nope", worker_id="w1"), grpc.StatusCode.NOT_FOUND, "'nope'")
    await stub.RegisterWorker(
        registry_pb2.RegisterWorkerRequest(
            worker=registry_pb2.Worker(worker_id="w1", address="127.0.0.1:7001", models=["tiny-llama"])
        )
    )
    await expect(
        stub,
        Stop(model="qwen2", worker_id="w1"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "worker 'w1' serves ['tiny-llama'], not 'qwen2-0.5b-instruct'",
    )


async def test_unreachable_supervisor_is_unavailable(make_registry: Any) -> None:
    address = refused_address()
    _, stub = await make_registry(supervisor_address=address)
    for request in (Start(model="tiny"), Stop(model="tiny", worker_id="w1")):
        await expect(stub, request, grpc.StatusCode.UNAVAILABLE, f"the worker supervisor at {address}")
    # Nothing changed meanwhile: the stop did not drain anything.
    assert not (await stub.ListWorkers(registry_pb2.ListWorkersRequest())).workers
