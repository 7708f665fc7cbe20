"""Through a real Envoy (started by EnvoyProcess) in front of real gRPC stand-in servers:
REST routing of every binding, stream routing, SSE, gRPC passthrough, request ids, access log."""

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
from llmesh.edge.descriptor import http_routes
from llmesh.edge.settings import GRPC_SERVICE_OF
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc
from llmesh.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from tests.edge.edge_http import CLUSTER_OF, assert_openai_error, calls_of, concrete, request, run
from tests.edge.edge_standins import StandIn, wait_until

pytestmark = pytest.mark.envoy


# ------------------------------------------------------------------ REST routing


async def test_every_rest_binding_reaches_its_rpc(
    edge: EnvoyProcess, standins: dict[str, StandIn], descriptor_path: Path
) -> None:
    """Each google.api.http binding of the contracts, called over REST, arrives at the right
    service as the right RPC, with the request id."""
    for route in http_routes(descriptor_path):
        request_id = f"route-{uuid.uuid4().hex}"
        body = b"{}" if route.body else None
        response = await request(
            edge,
            route.verb,
            concrete(route),
            content=body,
            headers={"x-request-id": request_id, "content-type": "application/json"},
        )
        assert calls_of(standins, request_id) == [(CLUSTER_OF[route.service], route.grpc_path)], (
            route,
            response.status_code,
            response.text,
        )
        assert response.headers["x-request-id"] == request_id
        if response.status_code >= 400:
            assert_openai_error(response, response.status_code, response.json()["error"]["type"])


STREAM_CASES = [
    (b'{"model":"tiny","stream":true}', "StreamChatCompletion"),
    (b'{ "model" : "tiny" ,\n "stream"\t:  true }', "StreamChatCompletion"),
    (b'{"stream":false,"model":"tiny","stream":true}', "StreamChatCompletion"),
    (b'{"model":"tiny","stream":false}', "CreateChatCompletion"),
    (b'{"model":"tiny"}', "CreateChatCompletion"),
    # "stream" inside content or nested objects is not the top-level flag.
    (b'{"model":"tiny","messages":[{"role":"user","content":"\\"stream\\": true"}]}', "CreateChatCompletion"),
    (b'{"model":"tiny","tools":[{"stream":true}],"messages":[]}', "CreateChatCompletion"),
    (b'{"model":"tiny","user":"stream","stop":"\\"stream\\":true"}', "CreateChatCompletion"),
]


@pytest.mark.parametrize(("body", "rpc"), STREAM_CASES)
async def test_top_level_stream_true_selects_the_streaming_rpc(
    edge: EnvoyProcess, standins: dict[str, StandIn], body: bytes, rpc: str
) -> None:
    request_id = uuid.uuid4().hex
    await request(
        edge,
        "POST",
        "/v1/chat/completions",
        content=body,
        headers={"x-request-id": request_id, "content-type": "application/json; charset=utf-8"},
    )
    assert calls_of(standins, request_id) == [("gateway", f"/llmesh.model.v1.ModelService/{rpc}")]


@pytest.mark.parametrize(
    ("path", "body", "rpc"),
    [
        ("/v1/completions", b'{"model":"tiny","prompt":"hi","stream":true}', "StreamCompletion"),
        ("/v1/completions", b'{"model":"tiny","prompt":"hi"}', "CreateCompletion"),
        ("/v1/chat/completions?trace=1", b'{"model":"tiny","stream":true}', "StreamChatCompletion"),
        ("/v1/chat/completions:stream", b'{"model":"tiny"}', "StreamChatCompletion"),
    ],
)
async def test_stream_routing_of_other_paths(
    edge: EnvoyProcess, standins: dict[str, StandIn], path: str, body: bytes, rpc: str
) -> None:
    request_id = uuid.uuid4().hex
    await request(edge, "POST", path, content=body, headers={"x-request-id": request_id})
    assert calls_of(standins, request_id) == [("gateway", f"/llmesh.model.v1.ModelService/{rpc}")]


async def test_path_variables_are_unescaped(edge: EnvoyProcess) -> None:
    response = await request(edge, "GET", "/v1/models/tiny")
    assert response.status_code == 200 and response.json()["id"] == "tiny"
    # A model name with a slash travels as %2F and arrives whole.
    response = await request(edge, "GET", "/v1/models/org%2Fname")
    error = assert_openai_error(response, 404, "not_found_error")
    assert "'org/name'" in error["message"]


async def test_streams_are_server_sent_events(edge: EnvoyProcess) -> None:
    body = {"model": "tiny", "stream": True, "stream_options": {"include_usage": True}, "messages": []}
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        raw = b"".join([part async for part in response.aiter_bytes()]).decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    chunks = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, event
        chunks.append(json.loads(event.removeprefix("data: ")))
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello world"
    )
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "role" not in chunks[1]["choices"][0]["delta"]  # unset optional fields are omitted
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6
    assert isinstance(chunks[0]["created"], int)


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


async def test_grpcurl_streams_a_chat_through_envoy(edge: EnvoyProcess, grpcurl_bin: str) -> None:
    rc, out, err = await run(
        grpcurl_bin,
        "-plaintext",
        "-d",
        '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}',
        edge.grpc_target,
        "llmesh.model.v1.ModelService/StreamChatCompletion",
    )
    assert rc == 0, err
    assert out.count('"object": "chat.completion.chunk"') == 4


async def test_native_grpc_passes_through(edge: EnvoyProcess, standins: dict[str, StandIn]) -> None:
    async with grpc.aio.insecure_channel(edge.grpc_target) as channel:
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        listed = await models.ListModels(pb.ListModelsRequest(), timeout=10)
        assert [card.id for card in listed.data] == ["tiny"]
        request_id = uuid.uuid4().hex
        chunks = [
            chunk
            async for chunk in models.StreamChatCompletion(
                pb.CreateChatCompletionRequest(model="tiny"),
                metadata=(("x-request-id", request_id),),
                timeout=10,
            )
        ]
        assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "Hello world"
        assert calls_of(standins, request_id) == [
            ("gateway", "/llmesh.model.v1.ModelService/StreamChatCompletion")
        ]
        # Internal RPCs without a REST binding reach their service natively.
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry.Heartbeat(registry_service_pb2.HeartbeatRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert caught.value.details() == "stand-in registry got /llmesh.registry.v1.RegistryService/Heartbeat"
        # Errors keep their gRPC status and message.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await models.CreateChatCompletion(pb.CreateChatCompletionRequest(model="missing"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="llmesh.model.v1.ModelService"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------ request ids and logs


async def test_request_id_is_generated_returned_and_forwarded(
    edge: EnvoyProcess, standins: dict[str, StandIn]
) -> None:
    response = await request(edge, "GET", "/v1/models")
    assert response.status_code == 200
    generated = response.headers["x-request-id"]
    assert generated
    assert calls_of(standins, generated) == [("gateway", "/llmesh.model.v1.ModelService/ListModels")]
    # A client's UUID-shaped id arrives unchanged (Envoy would pack trace bits into it).
    sent = str(uuid.uuid4())
    response = await request(edge, "GET", "/v1/models", headers={"x-request-id": sent})
    assert response.headers["x-request-id"] == sent
    assert calls_of(standins, sent) == [("gateway", "/llmesh.model.v1.ModelService/ListModels")]


async def test_access_log_is_json_with_request_ids(edge: EnvoyProcess) -> None:
    request_id = f"log-{uuid.uuid4().hex}"
    await request(edge, "GET", "/v1/models", headers={"x-request-id": request_id})
    line = (await logged_lines(edge, request_id))[request_id]
    assert line["method"] == "GET"
    assert line["path"] == "/v1/models"
    assert line["rpc"] == "/llmesh.model.v1.ModelService/ListModels"
    assert line["status"] == 200
    assert line["grpc_status"] == "OK"
    assert line["upstream_cluster"] == "gateway"
    assert line["upstream_host"] == standins_address(edge, "gateway")
    assert isinstance(line["duration_ms"], int)
    assert line["error_code"] is None


async def test_access_log_keeps_what_the_client_sent(edge: EnvoyProcess) -> None:
    stream_id, missing_id = f"log-{uuid.uuid4().hex}", f"log-{uuid.uuid4().hex}"
    await request(
        edge,
        "POST",
        "/v1/chat/completions",
        json_body={"model": "tiny", "stream": True},
        headers={"x-request-id": stream_id},
    )
    await request(edge, "GET", "/v1/models/missing", headers={"x-request-id": missing_id})
    lines = await logged_lines(edge, stream_id, missing_id)
    assert lines[stream_id]["path"] == "/v1/chat/completions"
    assert lines[stream_id]["rpc"] == "/llmesh.model.v1.ModelService/StreamChatCompletion"
    assert lines[missing_id]["status"] == 404
    assert lines[missing_id]["error_code"] == "NOT_FOUND"


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
    assert names == set(GRPC_SERVICE_OF)
