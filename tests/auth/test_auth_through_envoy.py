"""AuthService enforced at the edge: the real Envoy (ext_authz after the transcoder, then the
picker), AuthService, the scheduler reporting usage to the ledger, ScriptedEngine workers (a test
double: these tests are about admission and accounting, not inference)."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest

from llmesh.auth.v1 import auth_service_pb2 as auth_pb
from llmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.registry.v1 import registry_service_pb2 as registry_pb
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tests.scripted_stack import MODEL, ScriptedStack, chat, engine, settled

pytestmark = pytest.mark.envoy

CHAT = {
    "model": MODEL.name,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 4,
    "ignore_eos": True,
}


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def make_key(
    stack: ScriptedStack,
    username: str,
    *,
    models: tuple[str, ...] = (),
    rpm: int = 0,
    limits: auth_pb.Limits | None = None,
) -> str:
    """A user-role account with one API key, created by the admin through the edge."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.envoy.port}") as channel:
        auth = auth_grpc.AuthServiceStub(channel)
        admin = bearer(stack.admin_key)
        user = await auth.Register(
            auth_pb.RegisterRequest(username=username, password="password-123"), metadata=admin
        )
        created = await auth.CreateApiKey(
            auth_pb.CreateApiKeyRequest(
                name="test",
                user_id=user.user.user_id,
                allowed_models=list(models),
                limits=limits or auth_pb.Limits(requests_per_minute=rpm),
            ),
            metadata=admin,
        )
    return created.secret


async def ledger(stack: ScriptedStack) -> list[auth_pb.UsageRow]:
    async with grpc.aio.insecure_channel(stack.addresses["auth"]) as channel:
        usage = await auth_grpc.AuthServiceStub(channel).GetUsage(
            auth_pb.GetUsageRequest(), metadata=bearer(stack.admin_key)
        )
    return list(usage.rows)


async def test_no_key_is_401_for_rest_and_unauthenticated_for_grpc(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True, auth=True)
    async with httpx.AsyncClient(base_url=stack.envoy.url, timeout=30) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and "Bearer" in error["message"]
        bad = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer llm_garbage"}
        )
        assert bad.status_code == 401
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.models.CreateChatCompletion(chat(max_tokens=2))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await ledger(stack) == []  # nothing was admitted, nothing charged


async def test_a_key_streams_and_the_ledger_holds_one_row_per_request(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True, auth=True)
    key = await make_key(stack, "alice")
    async with httpx.AsyncClient(base_url=stack.envoy.url, timeout=30) as client:
        for _ in range(2):
            response = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}
            )
            assert response.status_code == 200, response.text
    chunks = [
        c
        async for c in stack.models.StreamChatCompletion(
            chat(max_tokens=5, ignore_eos=True), metadata=bearer(key)
        )
    ]
    assert sum(1 for c in chunks if c.choices) == 5
    await settled(stack)

    async def recorded() -> list[auth_pb.UsageRow]:
        for _ in range(200):
            rows = [r for r in await ledger(stack) if r.model == MODEL.name]
            if sum(r.requests for r in rows) >= 3:
                return rows
            await asyncio.sleep(0.05)
        raise AssertionError(f"the ledger never got 3 requests: {await ledger(stack)}")

    rows = await recorded()
    assert sum(r.requests for r in rows) == 3
    assert sum(r.completion_tokens for r in rows) == 4 + 4 + 5


async def test_an_openai_stream_through_auth_ends_with_done(stack_factory) -> None:
    # Check removes client-sent x-llmesh-* headers; the edge's own SSE marker must survive it, or
    # OpenAI clients never see `data: [DONE]`.
    stack = await stack_factory({"w0": engine()}, edge=True, auth=True)
    async with httpx.AsyncClient(base_url=stack.envoy.url, timeout=30) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"authorization": f"Bearer {stack.admin_key}", "x-llmesh-sse": "0"},
        )
    assert response.status_code == 200, response.text
    frames = [f for f in response.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]" and frames.count("data: [DONE]") == 1, frames[-2:]
    assert len(frames) >= 3


async def test_a_cancelled_stream_is_charged_what_it_streamed(stack_factory) -> None:
    slow = engine(tokens_per_second=40)
    stack = await stack_factory({"w0": slow}, edge=True, auth=True)
    key = await make_key(stack, "bob")
    call = stack.models.StreamChatCompletion(chat(max_tokens=64, ignore_eos=True), metadata=bearer(key))
    received = 0
    async for chunk in call:
        received += len(chunk.choices)
        if received == 5:
            break
    call.cancel()
    await settled(stack)
    for _ in range(200):
        rows = [r for r in await ledger(stack) if r.model == MODEL.name]
        if rows:
            break
        await asyncio.sleep(0.05)
    assert [r.requests for r in rows] == [1]
    # The worker's count at the cancel: at least what the client got, not the 64 it asked for.
    assert 5 <= rows[0].completion_tokens < 40, rows  # what streamed, not the 64 asked for


async def test_a_key_limited_to_other_models_gets_403(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True, auth=True)
    key = await make_key(stack, "carol", models=("other-*",))
    async with httpx.AsyncClient(base_url=stack.envoy.url, timeout=30) as client:
        response = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}
        )
    assert response.status_code == 403, response.text
    assert response.json()["error"]["type"] == "permission_error"


async def test_a_user_cannot_call_admin_rpcs_even_with_a_forged_role_header(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True, auth=True)
    key = await make_key(stack, "dave")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.envoy.port}") as channel:
        registry = registry_grpc.RegistryServiceStub(channel)
        forged = (*bearer(key), ("x-llmesh-role", "admin"), ("x-llmesh-user", "root"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await registry.CreateModel(
                registry_pb.CreateModelRequest(model=registry_pb.Model(name="evil")), metadata=forged
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_30_concurrent_requests_on_a_10_rpm_key_admit_exactly_10(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True, auth=True, max_queue_depth=64)
    key = await make_key(stack, "erin", rpm=10)
    async with httpx.AsyncClient(base_url=stack.envoy.url, timeout=60) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions",
                    json={**CHAT, "max_tokens": 1},
                    headers={"authorization": f"Bearer {key}"},
                )
                for _ in range(30)
            )
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 10 and statuses.count(429) == 20, statuses
    assert all(r.headers.get("retry-after") for r in responses if r.status_code == 429)


async def test_health_and_listing_models_need_no_key_but_chat_does(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True, auth=True)
    async with httpx.AsyncClient(base_url=stack.envoy.url, timeout=30) as client:
        jwks = await client.get("/v1/auth/jwks")
        assert jwks.status_code == 200 and jwks.json()["keys"]
    listing = await stack.models.ListModels(pb.ListModelsRequest(), metadata=bearer(stack.admin_key))
    assert listing.data[0].id == MODEL.name


async def test_grpcurl_lists_without_a_key_and_streams_with_one(stack_factory) -> None:
    """The README's grpcurl lines against `llmesh up` (auth on): reflection is a bidirectional
    stream whose body never ends, so AuthService checks it on its headers alone."""
    from tests.edge.edge_http import run
    from tests.support import grpcurl_path

    stack = await stack_factory({"w0": engine()}, edge=True, auth=True)
    edge = f"127.0.0.1:{stack.envoy.port}"
    code, out, err = await asyncio.wait_for(run(grpcurl_path(), "-plaintext", edge, "list"), 30)
    # Every public service behind the edge is described, wherever Envoy routes it.
    for service in ("Model", "Registry", "Auth", "Scheduler"):
        assert f"llmesh.{service.lower()}.v1.{service}Service" in out.split(), (out, err)
    admin = f"authorization: Bearer {stack.admin_key}"
    status = "llmesh.scheduler.v1.SchedulerService/GetSchedulerStatus"
    code, out, err = await asyncio.wait_for(run(grpcurl_path(), "-plaintext", "-H", admin, edge, status), 30)
    assert code == 0 and '"worker_id": "w0"' in out, (out, err)
    chat_body = json.dumps(
        {"model": MODEL.name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    )
    method = "llmesh.model.v1.ModelService/StreamChatCompletion"
    code, out, err = await asyncio.wait_for(
        run(
            grpcurl_path(),
            "-plaintext",
            "-H",
            f"authorization: Bearer {stack.admin_key}",
            "-d",
            chat_body,
            edge,
            method,
        ),
        30,
    )
    assert code == 0 and '"finish_reason": "length"' in out, (out, err)
    code, out, err = await asyncio.wait_for(
        run(grpcurl_path(), "-plaintext", "-d", chat_body, edge, method), 30
    )
    assert code != 0 and "Unauthenticated" in err, err
