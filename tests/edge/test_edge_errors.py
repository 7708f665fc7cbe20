"""Errors through a real Envoy in front of real gRPC stand-ins for the control-plane services: gRPC
statuses as HTTP statuses with OpenAI-shaped JSON bodies, retry hints, bad JSON, size limits,
upstreams (and so the endpoint picker) down or NOT_SERVING. Errors of the token path itself (no
capacity, unknown model, failure mid-stream) are tested on the real stack (test_edge_openai.py)."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import httpx
import pytest

from llmesh.edge import EnvoyProcess
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc
from llmesh.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from tests.edge.edge_http import assert_openai_error, calls_of, request
from tests.edge.edge_standins import StandIn, wait_until

pytestmark = pytest.mark.envoy


@pytest.mark.parametrize(
    ("code", "status", "error_type"),
    [
        ("INVALID_ARGUMENT", 400, "invalid_request_error"),
        ("FAILED_PRECONDITION", 400, "invalid_request_error"),
        ("OUT_OF_RANGE", 400, "invalid_request_error"),
        ("UNAUTHENTICATED", 401, "authentication_error"),
        ("PERMISSION_DENIED", 403, "permission_error"),
        ("NOT_FOUND", 404, "not_found_error"),
        ("ALREADY_EXISTS", 409, "conflict_error"),
        ("ABORTED", 409, "conflict_error"),
        ("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
        ("CANCELLED", 499, "invalid_request_error"),
        ("INTERNAL", 500, "server_error"),
        ("UNKNOWN", 500, "server_error"),
        ("DATA_LOSS", 500, "server_error"),
        ("UNIMPLEMENTED", 501, "server_error"),
        ("UNAVAILABLE", 503, "server_error"),
        ("DEADLINE_EXCEEDED", 504, "server_error"),
    ],
)
async def test_grpc_status_becomes_http_status_and_openai_error(
    edge: EnvoyProcess, code: str, status: int, error_type: str
) -> None:
    response = await request(edge, "GET", "/v1/auth/me", headers={"x-test-code": code})
    error = assert_openai_error(response, status, error_type)
    assert error["code"] == code
    assert error["message"] == f"stand-in auth failed as asked: {code}"
    assert error["param"] is None


async def test_retry_hint_reaches_the_client(edge: EnvoyProcess) -> None:
    response = await request(
        edge,
        "GET",
        "/v1/auth/me",
        headers={"x-test-code": "RESOURCE_EXHAUSTED", "x-test-retry-after-ms": "1500"},
    )
    assert_openai_error(response, 429, "rate_limit_error")
    assert response.headers["retry-after-ms"] == "1500"
    assert response.headers["retry-after"] == "2"  # seconds, rounded up


@pytest.mark.parametrize(
    ("path", "body"),
    [
        *[
            (path, body)
            for path in ("/v1/auth/register", "/v1/registry/models")
            for body in (b"{bad json", b'{"model": "tiny"', b"[1, 2]", b'"text"')
        ],
        ("/v1/auth/register", b'{"username": {"x": 1}}'),
        ("/v1/registry/models", b'{"name": {"x": 1}}'),
    ],
)
async def test_malformed_json_is_a_400_with_a_json_body(edge: EnvoyProcess, path: str, body: bytes) -> None:
    response = await request(edge, "POST", path, content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["message"].startswith("invalid request: ")
    # (A body cut short can open the upstream call before the transcoder sees the end; Envoy
    # then resets it, so no service ever gets half a request.)


async def test_unknown_path_is_a_404_with_a_json_body(edge: EnvoyProcess) -> None:
    for method, path in (("GET", "/v1/nope"), ("POST", "/v1/chat"), ("GET", "/"), ("DELETE", "/v1/models")):
        response = await request(edge, method, path)
        error = assert_openai_error(response, 404, "not_found_error")
        assert path.split("?")[0] in error["message"]


def padded(size: int) -> bytes:
    """A JSON request of exactly `size` bytes, with fields RegisterRequest knows (the edge refuses
    unknown ones before the body reaches a service)."""
    head = b'{"password":"secret-password","username":"'
    tail = b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/auth/register"])
async def test_oversized_body_is_a_413_with_a_json_body(
    edge: EnvoyProcess, standins: dict[str, StandIn], path: str
) -> None:
    limit = edge.settings.max_request_bytes
    request_id = uuid.uuid4().hex
    response = await request(
        edge, "POST", path, content=padded(limit + 1), headers={"x-request-id": request_id}
    )
    error = assert_openai_error(response, 413, "invalid_request_error")
    assert str(limit) in error["message"]
    assert calls_of(standins, request_id) == []

    async def chunked() -> Any:  # no content-length: the limit still holds while buffering
        body = padded(limit + 1)
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
        response = await client.post(path, content=chunked())
    assert_openai_error(response, 413, "invalid_request_error")


async def test_body_at_the_limit_is_accepted(edge: EnvoyProcess, standins: dict[str, StandIn]) -> None:
    request_id = uuid.uuid4().hex
    response = await request(
        edge,
        "POST",
        "/v1/auth/register",
        content=padded(edge.settings.max_request_bytes - 64),
        headers={"x-request-id": request_id},
    )
    assert calls_of(standins, request_id) == [("auth", "/llmesh.auth.v1.AuthService/Register")]
    assert response.status_code == 501  # the stand-in implements nothing


async def test_upstream_down_is_a_503_with_a_json_body(edge_without_upstreams: EnvoyProcess) -> None:
    for path in ("/v1/models", "/v1/auth/me", "/v1/registry/workers", "/v1/scheduler/status"):
        response = await request(edge_without_upstreams, "GET", path)
        error = assert_openai_error(response, 503, "server_error")
        assert error["code"] == "UNAVAILABLE"
        assert "no healthy upstream" in error["message"], path
    # Inference: with the scheduler down there is no endpoint picker, and Envoy fails closed with
    # a 503 (not a 500: the picker being away is a dependency down, not a bug), streaming too.
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    for body in (chat, {**chat, "stream": True}):
        response = await request(edge_without_upstreams, "POST", "/v1/chat/completions", json_body=body)
        error = assert_openai_error(response, 503, "server_error")
        assert error["code"] == "UNAVAILABLE"
        assert "service unavailable" in error["message"]


async def test_upstream_down_is_unavailable_for_grpc_clients(edge_without_upstreams: EnvoyProcess) -> None:
    async with grpc.aio.insecure_channel(edge_without_upstreams.grpc_target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "no healthy upstream"  # not JSON: gRPC clients get gRPC errors
        # Internal RPCs have no route whether or not anything is up: never the picker's 503.
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry.Heartbeat(registry_service_pb2.HeartbeatRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        request_ = pb.CreateChatCompletionRequest(model="tiny")
        for call in (
            stub.CreateChatCompletion(request_, timeout=10),
            stub.StreamChatCompletion(request_, timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if isinstance(call, grpc.aio.UnaryStreamCall):
                    await call.read()
                else:
                    await call
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_not_serving_upstream_gets_no_traffic(edge: EnvoyProcess, standins: dict[str, StandIn]) -> None:
    registry = standins["registry"]

    async def status() -> int:
        return (await request(edge, "GET", "/v1/registry/workers")).status_code

    await registry.set_serving(False)
    try:
        await wait_until(lambda: _is(status, 503), timeout_s=15)
        seen = len(registry.calls)
        response = await request(edge, "GET", "/v1/registry/workers")
        assert_openai_error(response, 503, "server_error")
        assert len(registry.calls) == seen  # Envoy answered itself; the host got nothing
    finally:
        await registry.set_serving(True)
    await wait_until(lambda: _is(status, 501), timeout_s=15)


async def _is(probe: Any, expected: int) -> bool:
    return bool(await probe() == expected)
