"""Accounts and tokens over real gRPC, on SQLite, PostgreSQL and MySQL."""

from __future__ import annotations

import grpc
import jwt
import pytest
import sqlalchemy as sa

from llmesh.auth.v1 import auth_service_pb2 as pb
from tests.auth.conftest import ADMIN_PASSWORD, AuthFactory, bearer


async def _login(stub, username: str, password: str) -> pb.TokenPair:  # type: ignore[no-untyped-def]
    return (await stub.Login(pb.LoginRequest(username=username, password=password))).tokens


def _count_users(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT COUNT(*) FROM auth_users")).scalar()
    engine.dispose()
    return int(n or 0)


async def test_register_login_refresh_logout_getme(make_auth: AuthFactory, db_url: str) -> None:
    a = await make_auth(database_url=db_url, allow_registration=True)
    user = (await a.auth.Register(pb.RegisterRequest(username="alice", password="alice-password"))).user
    assert user.role == pb.ROLE_USER and user.credits == 1_000_000
    tokens = await _login(a.auth, "alice", "alice-password")
    assert tokens.token_type == "Bearer" and tokens.expires_in == 24 * 3600
    me = (await a.auth.GetMe(pb.GetMeRequest(), metadata=bearer(tokens.access_token))).user
    assert me.user_id == user.user_id and me.username == "alice"

    # Refresh rotates: the new pair works, the spent refresh token is refused, and reusing it
    # revokes the whole login (the new refresh token too).
    new = (await a.auth.Refresh(pb.RefreshRequest(refresh_token=tokens.refresh_token))).tokens
    assert new.refresh_token != tokens.refresh_token
    await a.auth.GetMe(pb.GetMeRequest(), metadata=bearer(new.access_token))
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await a.auth.Refresh(pb.RefreshRequest(refresh_token=tokens.refresh_token))
    assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (reused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as family:
        await a.auth.Refresh(pb.RefreshRequest(refresh_token=new.refresh_token))
    assert family.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # Logout revokes the refresh token of a fresh login.
    again = await _login(a.auth, "alice", "alice-password")
    await a.auth.Logout(pb.LogoutRequest(refresh_token=again.refresh_token))
    with pytest.raises(grpc.aio.AioRpcError) as out:
        await a.auth.Refresh(pb.RefreshRequest(refresh_token=again.refresh_token))
    assert out.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "logged out" in (out.value.details() or "")


async def test_admin_bootstrapped_once(make_auth: AuthFactory, sqlite_url: str) -> None:
    first = await make_auth(database_url=sqlite_url, admin_password="")
    assert len(first.bootstrap) == 1
    boot = first.bootstrap[0]
    assert boot.username == "admin" and boot.api_key.startswith("llm_") and len(boot.password) >= 16
    tokens = await _login(first.auth, "admin", boot.password)
    me = (await first.auth.GetMe(pb.GetMeRequest(), metadata=bearer(boot.api_key))).user
    assert me.role == pb.ROLE_ADMIN and me.credits == -1
    await first.running.stop(None)
    second = await make_auth(database_url=sqlite_url, admin_password="")
    assert second.bootstrap == []  # nothing printed or created the second time
    await second.auth.GetMe(pb.GetMeRequest(), metadata=bearer(tokens.access_token))
    assert _count_users(sqlite_url) == 1


async def test_wrong_password_garbage_and_oversized_inputs_change_nothing(
    make_auth: AuthFactory, db_url: str
) -> None:
    a = await make_auth(database_url=db_url, allow_registration=True)
    await a.auth.Register(pb.RegisterRequest(username="bob", password="bob-password"))
    before = _count_users(db_url)
    cases = [
        (
            a.auth.Login(pb.LoginRequest(username="bob", password="wrong-password")),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            a.auth.Login(pb.LoginRequest(username="nobody", password="bob-password")),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            a.auth.Login(pb.LoginRequest(username="bob", password="x" * 100_000)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            a.auth.Register(pb.RegisterRequest(username="u" * 5000, password="long-enough")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            a.auth.Register(pb.RegisterRequest(username="carol", password="short")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            a.auth.Register(pb.RegisterRequest(username="bob", password="bob-password")),
            grpc.StatusCode.ALREADY_EXISTS,
        ),
        (
            a.auth.GetMe(pb.GetMeRequest(), metadata=bearer("garbage.token.here")),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            a.auth.GetMe(pb.GetMeRequest(), metadata=bearer("llm_" + "z" * 43)),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (a.auth.GetMe(pb.GetMeRequest(), metadata=bearer("x" * 6000)), grpc.StatusCode.UNAUTHENTICATED),
        (a.auth.GetMe(pb.GetMeRequest()), grpc.StatusCode.UNAUTHENTICATED),
        (
            a.auth.Refresh(pb.RefreshRequest(refresh_token="rt_" + "q" * 5000)),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            a.auth.Refresh(pb.RefreshRequest(refresh_token="rt_not-a-real-one")),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
    ]
    for call, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == code, err.value.details()
        assert err.value.details()  # a message that says what was wrong
    assert _count_users(db_url) == before
    await _login(a.auth, "bob", "bob-password")  # the account still works


async def test_registration_closed_unless_admin(make_auth: AuthFactory) -> None:
    a = await make_auth()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.auth.Register(pb.RegisterRequest(username="dave", password="dave-password"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    made = await a.auth.Register(
        pb.RegisterRequest(username="dave", password="dave-password"), metadata=bearer(a.admin_key)
    )
    assert made.user.username == "dave"


async def test_jwt_verifies_with_the_published_jwks_alone(make_auth: AuthFactory, db_url: str) -> None:
    a = await make_auth(database_url=db_url)
    tokens = await _login(a.auth, "admin", ADMIN_PASSWORD)
    jwks = (await a.auth.GetJwks(pb.GetJwksRequest())).keys

    def verify(token: str, keys) -> dict:  # type: ignore[no-untyped-def]
        # Only PyJWT and the JWKS: what any third party would do.
        kid = jwt.get_unverified_header(token)["kid"]
        data = next(
            {
                k: v
                for k, v in (
                    ("kty", j.kty),
                    ("crv", j.crv),
                    ("x", j.x),
                    ("kid", j.kid),
                    ("alg", j.alg),
                    ("n", j.n),
                    ("e", j.e),
                )
                if v
            }
            for j in keys
            if j.kid == kid
        )
        key = jwt.PyJWK(data)
        return jwt.decode(token, key, algorithms=[data["alg"]], issuer="llmesh")

    claims = verify(tokens.access_token, jwks)
    assert claims["role"] == "admin" and claims["exp"] - claims["iat"] == 24 * 3600

    # Rotation: new tokens use the new key; the old token still verifies and still works.
    rotated = await a.auth.RotateSigningKey(
        pb.RotateSigningKeyRequest(), metadata=bearer(tokens.access_token)
    )
    fresh = await _login(a.auth, "admin", ADMIN_PASSWORD)
    assert jwt.get_unverified_header(fresh.access_token)["kid"] == rotated.kid
    jwks2 = (await a.auth.GetJwks(pb.GetJwksRequest())).keys
    assert {k.kid for k in jwks2} == {jwks[0].kid, rotated.kid}
    verify(tokens.access_token, jwks2)
    verify(fresh.access_token, jwks2)
    await a.auth.GetMe(pb.GetMeRequest(), metadata=bearer(tokens.access_token))
    # A tampered token does not verify.
    head, body, sig = fresh.access_token.split(".")
    with pytest.raises(jwt.InvalidSignatureError):
        verify(f"{head}.{body}.{sig[:-4]}AAAA", jwks2)


async def test_expired_access_token_is_refused(make_auth: AuthFactory) -> None:
    a = await make_auth(access_token_hours=1 / 3600)  # one second
    tokens = await _login(a.auth, "admin", ADMIN_PASSWORD)
    await a.auth.GetMe(pb.GetMeRequest(), metadata=bearer(tokens.access_token))
    import asyncio

    await asyncio.sleep(2.2)  # past expiry and past the credential cache
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.auth.GetMe(pb.GetMeRequest(), metadata=bearer(tokens.access_token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (err.value.details() or "")


async def test_rs256_keys(make_auth: AuthFactory) -> None:
    a = await make_auth(jwt_algorithm="RS256")
    tokens = await _login(a.auth, "admin", ADMIN_PASSWORD)
    (key,) = (await a.auth.GetJwks(pb.GetJwksRequest())).keys
    assert key.kty == "RSA" and key.alg == "RS256" and key.n and key.e
    pub = jwt.PyJWK({"kty": "RSA", "n": key.n, "e": key.e, "kid": key.kid, "alg": "RS256"})
    assert jwt.decode(tokens.access_token, pub, algorithms=["RS256"], issuer="llmesh")["typ"] == "access"


async def test_admin_rpcs_need_admin(make_auth: AuthFactory) -> None:
    a = await make_auth(allow_registration=True)
    await a.auth.Register(pb.RegisterRequest(username="erin", password="erin-password"))
    user = await _login(a.auth, "erin", "erin-password")
    for call in (
        a.auth.ListUsers(pb.ListUsersRequest(), metadata=bearer(user.access_token)),
        a.auth.RotateSigningKey(pb.RotateSigningKeyRequest(), metadata=bearer(user.access_token)),
        a.auth.UpdateUser(
            pb.UpdateUserRequest(user_id="x", add_credits=5), metadata=bearer(user.access_token)
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    users = (await a.auth.ListUsers(pb.ListUsersRequest(), metadata=bearer(a.admin_key))).users
    assert {u.username for u in users} == {"admin", "erin"}
    erin = next(u for u in users if u.username == "erin")
    updated = await a.auth.UpdateUser(
        pb.UpdateUserRequest(user_id=erin.user_id, add_credits=-999_000, disabled=True),
        metadata=bearer(a.admin_key),
    )
    assert updated.user.credits == 1000 and updated.user.disabled
    # Disabled takes effect at once on this replica (cache invalidated).
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.auth.GetMe(pb.GetMeRequest(), metadata=bearer(user.access_token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
