"""Through a real Envoy (started by EnvoyProcess) in front of real gRPC stand-ins for the
control-plane services: REST routing of every control-plane binding, gRPC passthrough, internal
RPCs unrouted, request ids, access log, admin. Inference with stand-ins only shows that nothing
reaches a service without the endpoint picker; the token path itself is tested against the real
stack in test_edge_inference.py and test_edge_openai.py."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.edge import EnvoyProcess
from llmesh.edge.bootstrap import NO_ROUTE_MESSAGE
from llmesh.edge.descriptor import http_routes
from llmesh.edge.settings import SERVICE_NAMES
from llmesh.edge.workers import WORKERS_CLUSTER, inference_paths
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc
from llmesh.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from llmesh.scheduler.v1 import scheduler_service_pb2, scheduler_service_pb2_grpc
from tests.edge.edge_http import CLUSTER_OF, assert_openai_error, calls_of, concrete, request, run
from tests.edge.edge_standins import StandIn, wait_until

pytestmark = pytest.mark.envoy


# ------------------------------------------------------------------ REST routing


async def test_every_control_plane_rest_binding_reaches_its_rpc(
    edge: EnvoyProcess, standins: dict[str, StandIn], descriptor_path: Path
) -> None:
    """Each google.api.http binding of a control-plane RPC (ModelService's catalog reads
    included), called over REST, arrives at the right service as the right RPC, with the
    request id."""
    inference = set(inference_paths())
    checked = 0
    for route in http_routes(descriptor_path):
        if route.grpc_path in inference:
            continue
        request_id = f"route-{uuid.uuid4().hex}"
        body = b"{}" if route.body else None
        response = await request(
            edge,
            route.verb,
            concrete(route),
            content=body,
            headers={"x-request-id": request_id, "content-type": "application/json"},
        )
        assert calls_of(standins, request_id) == [(CLUSTER_OF[route.grpc_path], route.grpc_path)], (
            route,
            response.status_code,
            response.text,
        )
        assert response.headers["x-request-id"] == request_id
        if response.status_code >= 400:
            assert_openai_error(response, response.status_code, response.json()["error"]["type"])
        checked += 1
    assert checked >= 30


async def test_inference_never_reaches_a_service_without_the_picker(
    edge: EnvoyProcess, standins: dict[str, StandIn], descriptor_path: Path
) -> None:
    """The scheduler stand-in does not answer ext_proc, so no worker can be picked: Envoy fails
    closed with 503, and no control-plane service gets the request instead."""
    inference = [route for route in http_routes(descriptor_path) if route.grpc_path in inference_paths()]
    assert {route.grpc_path for route in inference} == set(inference_paths())
    for route in inference:
        request_id = f"inference-{uuid.uuid4().hex}"
        response = await request(
            edge,
            route.verb,
            concrete(route),
            # What each RPC's body may carry (the edge refuses unknown fields with a 400 itself).
            json_body={
                "model": "tiny",
                **{
                    field: value
                    for field, value in (
                        ("messages", [{"role": "user", "content": "hi"}]),
                        ("prompt", "hi"),
                        ("input", "hi"),
                    )
                    if field in route.request_fields
                },
            },
            headers={"x-request-id": request_id},
        )
        error = assert_openai_error(response, 503, "server_error")
        assert error["code"] == "UNAVAILABLE"
        assert calls_of(standins, request_id) == [], route


async def test_path_variables_are_unescaped(edge: EnvoyProcess) -> None:
    response = await request(edge, "GET", "/v1/models/tiny")
    assert response.status_code == 200 and response.json()["id"] == "tiny"
    # A model name with a slash travels as %2F and arrives whole.
    response = await request(edge, "GET", "/v1/models/org%2Fname")
    error = assert_openai_error(response, 404, "not_found_error")
    assert "'org/name'" in error["message"]


# ------------------------------------------------------------------ native gRPC


async def test_grpcurl_lists_and_checks_health_through_envoy(edge: EnvoyProcess, grpcurl_bin: str) -> None:
    rc, out, err = await run(grpcurl_bin, "-plaintext", edge.grpc_target, "list")
    assert rc == 0, err
    assert {"llmesh.model.v1.ModelService", "grpc.health.v1.Health"} <= set(out.split())
    rc, out, err = await run(
        grpcurl_bin,
        "-plaintext",
        "-d",
        '{"service": "llmesh.model.v1.ModelService"}',
        edge.grpc_target,
        "grpc.health.v1.Health/Check",
    )
    assert rc == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_native_grpc_passes_through(edge: EnvoyProcess, standins: dict[str, StandIn]) -> None:
    async with grpc.aio.insecure_channel(edge.grpc_target) as channel:
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        request_id = uuid.uuid4().hex
        listed = await models.ListModels(
            pb.ListModelsRequest(), metadata=(("x-request-id", request_id),), timeout=10
        )
        assert [card.id for card in listed.data] == ["tiny"]
        assert calls_of(standins, request_id) == [("registry", "/llmesh.model.v1.ModelService/ListModels")]
        # Errors keep their gRPC status and message.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await models.GetModel(pb.GetModelRequest(model="missing"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "model 'missing' not found; GET /v1/models lists the models"
        # A public control-plane RPC without a catalog stand-in answer: the stand-in's own reply.
        scheduler = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.GetSchedulerStatus(scheduler_service_pb2.GetSchedulerStatusRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert caught.value.details() == (
            "stand-in scheduler got /llmesh.scheduler.v1.SchedulerService/GetSchedulerStatus"
        )
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="llmesh.model.v1.ModelService"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_internal_rpcs_have_no_route(edge: EnvoyProcess, standins: dict[str, StandIn]) -> None:
    """Membership and lease RPCs are for the inside of the mesh: Envoy answers UNIMPLEMENTED (no
    route) and the service never sees the call."""
    async with grpc.aio.insecure_channel(edge.grpc_target) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        scheduler = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        before = {name: len(s.calls) for name, s in standins.items()}
        for call in (
            registry.Heartbeat(registry_service_pb2.HeartbeatRequest(), timeout=10),
            registry.RegisterWorker(registry_service_pb2.RegisterWorkerRequest(), timeout=10),
            scheduler.Acquire(scheduler_service_pb2.AcquireRequest(), timeout=10),
            scheduler.Release(scheduler_service_pb2.ReleaseRequest(), timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert caught.value.details() == NO_ROUTE_MESSAGE  # Envoy's answer, not a service's
        assert {name: len(s.calls) for name, s in standins.items()} == before
    # Over HTTP too: no route is a 404.
    response = await request(edge, "POST", "/llmesh.registry.v1.RegistryService/Heartbeat", content=b"")
    assert_openai_error(response, 404, "not_found_error")


# ------------------------------------------------------------------ request ids and logs


async def test_request_id_is_generated_returned_and_forwarded(
    edge: EnvoyProcess, standins: dict[str, StandIn]
) -> None:
    response = await request(edge, "GET", "/v1/models")
    assert response.status_code == 200
    generated = response.headers["x-request-id"]
    assert generated
    assert calls_of(standins, generated) == [("registry", "/llmesh.model.v1.ModelService/ListModels")]
    # A client's UUID-shaped id arrives unchanged (Envoy would pack trace bits into it).
    sent = str(uuid.uuid4())
    response = await request(edge, "GET", "/v1/models", headers={"x-request-id": sent})
    assert response.headers["x-request-id"] == sent
    assert calls_of(standins, sent) == [("registry", "/llmesh.model.v1.ModelService/ListModels")]


async def test_access_log_is_json_with_request_ids(edge: EnvoyProcess) -> None:
    request_id = f"log-{uuid.uuid4().hex}"
    await request(edge, "GET", "/v1/models", headers={"x-request-id": request_id})
    line = (await logged_lines(edge, request_id))[request_id]
    assert line["method"] == "GET"
    assert line["path"] == "/v1/models"
    assert line["rpc"] == "/llmesh.model.v1.ModelService/ListModels"
    assert line["status"] == 200
    assert line["grpc_status"] == "OK"
    assert line["upstream_cluster"] == "registry"
    assert line["upstream_host"] == standins_address(edge, "registry")
    assert isinstance(line["duration_ms"], int)
    assert line["error_code"] is None
    assert line["picker_us"] is None  # a catalog read: the picker is off on this route


async def test_access_log_keeps_the_upstreams_error_code(edge: EnvoyProcess) -> None:
    missing_id = f"log-{uuid.uuid4().hex}"
    await request(edge, "GET", "/v1/models/missing", headers={"x-request-id": missing_id})
    line = (await logged_lines(edge, missing_id))[missing_id]
    assert line["path"] == "/v1/models/missing"
    assert line["rpc"] == "/llmesh.model.v1.ModelService/GetModel"
    assert line["status"] == 404
    assert line["error_code"] == "NOT_FOUND"


async def logged_lines(edge: EnvoyProcess, *request_ids: str) -> dict[str, dict[str, Any]]:
    log_path = Path(edge.settings.access_log_path)

    async def all_logged() -> bool:
        text = await asyncio.to_thread(log_path.read_text)
        return all(rid in text for rid in request_ids)

    await wait_until(all_logged, timeout_s=10)
    text = await asyncio.to_thread(log_path.read_text)
    entries = [json.loads(line) for line in text.splitlines()]
    return {entry["request_id"]: entry for entry in entries if entry["request_id"] in request_ids}


def standins_address(edge: EnvoyProcess, name: str) -> str:
    return str(getattr(edge.settings, name))


async def test_admin_listens_on_loopback_only(edge: EnvoyProcess) -> None:
    assert edge.admin_url.startswith("http://127.0.0.1:")
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{edge.admin_url}/clusters?format=json")
    assert response.status_code == 200
    names = {c["name"] for c in response.json()["cluster_statuses"]}
    assert names == {*SERVICE_NAMES, WORKERS_CLUSTER}
