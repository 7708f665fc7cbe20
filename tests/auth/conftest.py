"""Fixtures for AuthService tests: databases (SQLite, PostgreSQL, MySQL), Redis, real servers."""

from __future__ import annotations

import asyncio
import os
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace

import grpc
import pytest
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf.message import Message
from sqlalchemy.engine import make_url

from llmesh.auth.limiter import Limiter, MemoryLimiter
from llmesh.auth.migrate import VERSION_TABLE
from llmesh.auth.redis_limiter import RedisLimiter
from llmesh.auth.schema import metadata
from llmesh.auth.server import AuthServiceConfig, Bootstrap, start_auth
from llmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from llmesh.common.config import AuthConfig
from llmesh.common.server import RunningServer
from tests.support import require

SERVER_DATABASES = {
    "postgresql": os.environ.get(
        "LLMESH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mysql": os.environ.get("LLMESH_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
REDIS_URL = os.environ.get("LLMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_PASSWORD = "admin-password-1"


def _server_database(kind: str) -> Iterator[str]:
    admin_url = SERVER_DATABASES[kind]
    name = f"llmesh_auth_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.OperationalError as e:
        admin.dispose()
        shown = make_url(admin_url).render_as_string(hide_password=True)
        require(False, f"{kind} is not reachable at {shown} ({str(e.orig or e).splitlines()[0]})")
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if kind == "postgresql" else ""
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}{force}"))
        admin.dispose()


@pytest.fixture(scope="session")
def postgresql_database() -> Iterator[str]:
    yield from _server_database("postgresql")


@pytest.fixture(scope="session")
def mysql_database() -> Iterator[str]:
    yield from _server_database("mysql")


def reset_database(url: str) -> None:
    """Drop AuthService's tables and its version table, so migrations run from scratch."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        metadata.drop_all(conn)
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def db_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """A clean auth database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/auth.db"
    url: str = request.getfixturevalue(f"{request.param}_database")
    reset_database(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    return f"sqlite:///{tmp_path}/auth.db"


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The real Redis (required under CI)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as e:
        require(False, f"Redis is not reachable at {REDIS_URL} ({e}); start it or set LLMESH_TEST_REDIS_URL")
    finally:
        client.close()
    yield REDIS_URL


@pytest.fixture(params=["memory", "redis"])
def limiter_redis(request: pytest.FixtureRequest) -> str:
    """ "" for the in-process limiter, else the real Redis URL."""
    return "" if request.param == "memory" else str(request.getfixturevalue("redis_url"))


class FakeClock:
    """An injectable clock (seconds since the epoch) that moves only when a test moves it."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fake_clock_limiter(limiter_redis: str) -> AsyncIterator[tuple[Limiter, FakeClock]]:
    """A limiter on a FakeClock: in-process, or on the real Redis under a key prefix of its own."""
    clock = FakeClock()
    limiter: Limiter
    ns = uuid.uuid4().hex[:8]
    if limiter_redis:
        client = aioredis.Redis.from_url(limiter_redis, socket_connect_timeout=2, socket_timeout=10)
        limiter = RedisLimiter(client, prefix=f"llmesh-test:{{{ns}}}:", clock=clock)
    else:
        limiter = MemoryLimiter(clock)
    yield limiter, clock
    if limiter_redis:
        keys = [k async for k in client.scan_iter(match=f"llmesh-test:\\{{{ns}\\}}:*")]
        if keys:
            await client.delete(*keys)
    await limiter.close()


@dataclass
class AuthClient:
    """A started AuthService with stubs, and how to reach it."""

    running: RunningServer
    channel: grpc.aio.Channel
    auth: auth_grpc.AuthServiceStub
    authz: external_auth_pb2_grpc.AuthorizationStub
    config: AuthServiceConfig
    bootstrap: list[Bootstrap] = field(default_factory=list)

    @property
    def admin_key(self) -> str:
        return self.bootstrap[0].api_key


AuthFactory = Callable[..., Awaitable[AuthClient]]


@pytest.fixture
async def make_auth(sqlite_url: str) -> AsyncIterator[AuthFactory]:
    """Start AuthService processes-in-process; each test gets its own Redis key prefix and channel."""
    started: list[AuthClient] = []
    test_ns = uuid.uuid4().hex[:8]
    prefixes: list[str] = []

    async def make(
        *, database_url: str = sqlite_url, redis_url: str = "", shared_ns: bool = True, **auth: object
    ) -> AuthClient:
        ns = test_ns if shared_ns else uuid.uuid4().hex[:8]
        prefix = f"llmesh-test:{{{ns}}}:"
        prefixes.append(prefix)
        settings = {"admin_password": ADMIN_PASSWORD, "credential_cache_seconds": 2.0, **auth}
        config = AuthServiceConfig(
            listen="127.0.0.1:0",
            database_url=database_url,
            redis_url=redis_url,
            auth=replace(AuthConfig(), **settings),  # type: ignore[arg-type]
            redis_prefix=prefix,
            redis_channel=f"llmesh-test:{ns}:invalidate",
        )
        boots: list[Bootstrap] = []
        running = await start_auth(config, on_bootstrap=boots.append)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        client = AuthClient(
            running,
            channel,
            auth_grpc.AuthServiceStub(channel),
            external_auth_pb2_grpc.AuthorizationStub(channel),
            config,
            boots,
        )
        started.append(client)
        return client

    yield make
    for client in started:
        await client.channel.close(None)
        # Bounded: a stop that hangs fails here with its own message, not pytest's 600 s timeout.
        await asyncio.wait_for(client.running.stop(None), timeout=30)
    if any(c.config.redis_url for c in started):
        r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10)
        for prefix in set(prefixes):
            keys = list(r.scan_iter(match=prefix.replace("{", "\\{").replace("}", "\\}") + "*"))
            if keys:
                r.delete(*keys)
        r.close()


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying a credential."""
    return (("authorization", f"Bearer {token}"),)


def grpc_frame(message: Message) -> bytes:
    """A message as one uncompressed gRPC frame (what ext_authz sees with pack_as_bytes)."""
    payload = message.SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


def check_request(
    path: str, headers: dict[str, str] | None = None, body: Message | None = None
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy builds it after the transcoder."""
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST",
        path=path,
        headers={":path": path, "content-type": "application/grpc", **(headers or {})},
        raw_body=grpc_frame(body) if body is not None else b"",
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def header_map(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    """Headers Check sets, from whichever response it gave."""
    if response.HasField("ok_response"):
        opts = response.ok_response.headers
    else:
        opts = response.denied_response.headers
    return {h.header.key: h.header.value for h in opts}


def envoy_applies(
    request_headers: dict[str, str], response: external_auth_pb2.CheckResponse
) -> dict[str, str]:
    """The upstream request's headers after Envoy applies an OK CheckResponse, in Envoy's order
    (ext_authz.cc: `headers` are set first, then `headers_to_remove` are removed)."""
    out = {k.lower(): v for k, v in request_headers.items()}
    for option in response.ok_response.headers:
        out[option.header.key.lower()] = option.header.value
    for name in response.ok_response.headers_to_remove:
        out.pop(name.lower(), None)
    return out
