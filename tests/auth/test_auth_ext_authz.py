"""Envoy's ext_authz Check over real gRPC, with CheckRequests built as Envoy builds them."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from google.rpc import code_pb2

from llmesh.auth import routes
from llmesh.auth.v1 import auth_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2 as model_pb2
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from tests.auth.conftest import (
    ADMIN_PASSWORD,
    AuthClient,
    AuthFactory,
    bearer,
    check_request,
    envoy_applies,
    header_map,
)

CHAT = routes.MODEL + "StreamChatCompletion"


def chat(
    model: str = "tiny-llama", max_tokens: int = 16, text: str = "hi"
) -> model_pb2.CreateChatCompletionRequest:
    req = model_pb2.CreateChatCompletionRequest(model=model, max_tokens=max_tokens)
    req.messages.add(role="user").content.string_value = text
    return req


async def _user_key(a: AuthClient, username: str = "frank", **key: object) -> tuple[str, str]:
    """A new user and one API key of theirs: (user_id, key secret)."""
    user = (
        await a.auth.Register(
            pb.RegisterRequest(username=username, password="long-password"), metadata=bearer(a.admin_key)
        )
    ).user
    made = await a.auth.CreateApiKey(
        pb.CreateApiKeyRequest(user_id=user.user_id, **key), metadata=bearer(a.admin_key)
    )  # type: ignore[arg-type]
    return user.user_id, made.secret


def _error(response) -> dict:  # type: ignore[no-untyped-def]
    body = json.loads(response.denied_response.body)
    assert set(body["error"]) == {"message", "type", "code", "param"}
    return body["error"]


async def test_no_bad_or_revoked_credentials_are_401(make_auth: AuthFactory) -> None:
    a = await make_auth()
    _, key = await _user_key(a)
    for headers in (
        {},
        {"authorization": "Bearer nonsense"},
        {"authorization": "Basic abc"},
        {"x-api-key": "llm_" + "0" * 43},
    ):
        r = await a.authz.Check(check_request(CHAT, headers, chat()))
        assert r.status.code == code_pb2.UNAUTHENTICATED
        assert r.denied_response.status.code == 401
        err = _error(r)
        assert err["type"] == "authentication_error" and err["code"] == "UNAUTHENTICATED" and err["message"]
        assert header_map(r)["grpc-status"] == str(code_pb2.UNAUTHENTICATED)
    ok = await a.authz.Check(check_request(CHAT, {"x-api-key": key}, chat()))
    assert ok.status.code == code_pb2.OK


async def test_allowed_request_gets_identity_headers_and_client_ones_are_stripped(
    make_auth: AuthFactory,
) -> None:
    a = await make_auth()
    user_id, key = await _user_key(a)
    sent = {
        "authorization": f"Bearer {key}",
        "x-llmesh-user": "admin",
        "x-llmesh-role": "admin",
        "x-llmesh-request-id": "mine",
        "x-llmesh-extra": "1",
    }
    r = await a.authz.Check(check_request(CHAT, sent, chat()))
    assert r.status.code == code_pb2.OK
    upstream = envoy_applies(sent, r)
    assert upstream["x-llmesh-user"] == user_id and upstream["x-llmesh-role"] == "user"
    assert upstream["x-llmesh-key-id"] and upstream["x-llmesh-tenant"] == user_id
    assert len(upstream["x-llmesh-request-id"]) == 32 and upstream["x-llmesh-request-id"] != "mine"
    assert "x-llmesh-extra" not in upstream
    # Nothing Check sets is also removed (Envoy removes after setting: it would drop ours).
    assert not set(header_map(r)) & set(r.ok_response.headers_to_remove)
    again = await a.authz.Check(check_request(CHAT, {"authorization": f"Bearer {key}"}, chat()))
    assert header_map(again)["x-llmesh-request-id"] != upstream["x-llmesh-request-id"]


async def test_jwt_caller_has_no_key_header_even_if_the_client_sent_one(make_auth: AuthFactory) -> None:
    a = await make_auth()
    token = (
        await a.auth.Login(pb.LoginRequest(username="admin", password=ADMIN_PASSWORD))
    ).tokens.access_token
    sent = {"authorization": f"Bearer {token}", "x-llmesh-key-id": "forged"}
    r = await a.authz.Check(check_request(CHAT, sent, chat()))
    upstream = envoy_applies(sent, r)
    assert "x-llmesh-key-id" not in upstream and upstream["x-llmesh-role"] == "admin"


async def test_model_allow_list_is_403(make_auth: AuthFactory) -> None:
    a = await make_auth()
    _, key = await _user_key(a, allowed_models=["tiny-*"])
    auth = {"authorization": f"Bearer {key}"}
    assert (await a.authz.Check(check_request(CHAT, auth, chat("tiny-llama")))).status.code == code_pb2.OK
    text = model_pb2.CreateCompletionRequest(model="qwen2-0.5b")
    for path, body in ((CHAT, chat("qwen2-0.5b")), (routes.MODEL + "CreateCompletion", text)):
        r = await a.authz.Check(check_request(path, auth, body))
        assert r.status.code == code_pb2.PERMISSION_DENIED and r.denied_response.status.code == 403
        assert "qwen2-0.5b" in _error(r)["message"]
    tok = model_pb2.TokenizeRequest(model="other", prompt="x")
    assert (
        await a.authz.Check(check_request(routes.MODEL + "Tokenize", auth, tok))
    ).status.code == code_pb2.PERMISSION_DENIED


async def test_user_calling_admin_rpc_is_403_admin_passes(make_auth: AuthFactory) -> None:
    a = await make_auth()
    _, key = await _user_key(a)
    create = routes.REGISTRY + "CreateModel"
    body = registry_pb2.CreateModelRequest()
    r = await a.authz.Check(check_request(create, {"authorization": f"Bearer {key}"}, body))
    assert r.status.code == code_pb2.PERMISSION_DENIED and r.denied_response.status.code == 403
    assert _error(r)["type"] == "permission_error"
    admin = await a.authz.Check(check_request(create, {"authorization": f"Bearer {a.admin_key}"}, body))
    assert admin.status.code == code_pb2.OK and header_map(admin)["x-llmesh-role"] == "admin"


async def test_internal_rpcs_denied_and_public_routes_need_nothing(make_auth: AuthFactory) -> None:
    a = await make_auth()
    for path in (
        routes.REGISTRY + "RegisterWorker",
        routes.SCHEDULER + "Acquire",
        routes.AUTH + "RecordUsage",
    ):
        r = await a.authz.Check(check_request(path, {"authorization": f"Bearer {a.admin_key}"}))
        assert r.status.code == code_pb2.PERMISSION_DENIED, path
    for path in (routes.AUTH + "Login", routes.AUTH + "GetJwks", "/grpc.health.v1.Health/Check"):
        sent = {"x-llmesh-user": "forged", "x-llmesh-role": "admin"}
        r = await a.authz.Check(check_request(path, sent))
        assert r.status.code == code_pb2.OK, path
        assert set(envoy_applies(sent, r)) == {"x-llmesh-request-id"}
    # Register is public only when registration is open.
    closed = await a.authz.Check(check_request(routes.AUTH + "Register"))
    assert closed.status.code == code_pb2.UNAUTHENTICATED


async def test_bad_body_is_400_not_a_crash(make_auth: AuthFactory) -> None:
    a = await make_auth()
    _, key = await _user_key(a)
    request = check_request(CHAT, {"authorization": f"Bearer {key}"})
    for raw in (b"", b"\x00\x00\x00\x00\x10abc", b"\x00\x00\x00\x00\x03\xff\xff\xff"):
        request.attributes.request.http.raw_body = raw
        r = await a.authz.Check(request)
        assert r.status.code == code_pb2.INVALID_ARGUMENT and r.denied_response.status.code == 400


@pytest.mark.parametrize("with_redis", [False, True], ids=["memory", "redis"])
async def test_revoked_key_refused_within_5s_on_every_replica(
    make_auth: AuthFactory, db_url: str, with_redis: bool, request: pytest.FixtureRequest
) -> None:
    redis_url = request.getfixturevalue("redis_url") if with_redis else ""
    a = await make_auth(database_url=db_url, redis_url=redis_url)
    b = await make_auth(database_url=db_url, redis_url=redis_url)  # a second replica, same database
    key_user, key = await _user_key(a)
    keys = (
        await a.auth.ListApiKeys(pb.ListApiKeysRequest(user_id=key_user), metadata=bearer(a.admin_key))
    ).keys
    auth = {"authorization": f"Bearer {key}"}
    for replica in (a, b):  # both have it cached now
        assert (await replica.authz.Check(check_request(CHAT, auth, chat()))).status.code == code_pb2.OK
    await a.auth.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=keys[0].key_id), metadata=bearer(a.admin_key))
    t0 = time.monotonic()
    assert (await a.authz.Check(check_request(CHAT, auth, chat()))).status.code == code_pb2.UNAUTHENTICATED
    while (await b.authz.Check(check_request(CHAT, auth, chat()))).status.code == code_pb2.OK:
        assert time.monotonic() - t0 < 5.0, "revocation took longer than 5 s to reach the other replica"
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - t0
    print(
        f"revocation reached the other replica in {elapsed * 1000:.0f} ms ({'redis pub/sub' if with_redis else 'cache TTL'})"
    )
    if with_redis:
        assert elapsed < 1.0  # pub/sub, not the TTL
    listed = (
        await a.auth.ListApiKeys(pb.ListApiKeysRequest(user_id=key_user), metadata=bearer(a.admin_key))
    ).keys
    assert listed[0].revoked


async def test_expired_key_and_jwt_are_401(make_auth: AuthFactory) -> None:
    a = await make_auth()
    user_id, _ = await _user_key(a)
    made = await a.auth.CreateApiKey(
        pb.CreateApiKeyRequest(user_id=user_id, ttl_seconds=1), metadata=bearer(a.admin_key)
    )
    auth = {"authorization": f"Bearer {made.secret}"}
    assert (await a.authz.Check(check_request(CHAT, auth, chat()))).status.code == code_pb2.OK
    await asyncio.sleep(3.2)  # past expiry and the credential cache
    r = await a.authz.Check(check_request(CHAT, auth, chat()))
    assert r.status.code == code_pb2.UNAUTHENTICATED and "expired" in _error(r)["message"]


async def test_users_manage_only_their_own_keys(make_auth: AuthFactory) -> None:
    a = await make_auth()
    _, key1 = await _user_key(a, "gina")
    user2, key2 = await _user_key(a, "hank")
    theirs = (await a.auth.ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(key2))).keys
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.auth.ListApiKeys(pb.ListApiKeysRequest(user_id=user2), metadata=bearer(key1))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.auth.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=theirs[0].key_id), metadata=bearer(key1))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    mine = await a.auth.CreateApiKey(pb.CreateApiKeyRequest(name="second"), metadata=bearer(key2))
    assert mine.secret.startswith("llm_") and mine.key.prefix == mine.secret[:12]
    listed = (await a.auth.ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(key2))).keys
    assert [k.name for k in listed][-1] == "second" and not any(mine.secret in str(k) for k in listed)


async def test_raw_header_map_is_read_too(make_auth: AuthFactory) -> None:
    """Envoy with encode_raw_headers sends header_map (raw bytes) instead of the headers map."""
    a = await make_auth()
    _, key = await _user_key(a)
    request = check_request(CHAT, None, chat())
    http = request.attributes.request.http
    http.ClearField("headers")
    http.header_map.headers.add(key="Authorization", raw_value=f"Bearer {key}".encode())
    http.header_map.headers.add(key="x-llmesh-user", raw_value=b"forged")
    r = await a.authz.Check(request)
    assert r.status.code == code_pb2.OK
    assert envoy_applies({"x-llmesh-user": "forged"}, r)["x-llmesh-user"] != "forged"


async def test_rest_paths_fail_closed(make_auth: AuthFactory) -> None:
    """A REST path means ext_authz runs before the transcoder: deny, do not skip the reservation."""
    a = await make_auth()
    for path in ("/v1/chat/completions", "/v1/models", "/healthz", "/llmesh.model.v1.ModelService"):
        r = await a.authz.Check(check_request(path, {"authorization": f"Bearer {a.admin_key}"}))
        assert r.status.code == code_pb2.INTERNAL and r.denied_response.status.code == 500, path
        assert "transcoder" in _error(r)["message"]
    ok = await a.authz.Check(check_request(CHAT + "?x=1", {"authorization": f"Bearer {a.admin_key}"}, chat()))
    assert ok.status.code == code_pb2.OK
