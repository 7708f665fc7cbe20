"""Fixtures for RegistryService tests: catalog databases (SQLite, PostgreSQL, MySQL) and servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from llmesh.common.config import ModelConfig, TemplateConfig
from llmesh.common.server import RunningServer
from llmesh.registry.schema import VERSION_TABLE, metadata
from llmesh.registry.server import RegistryServiceConfig, start_registry
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tests.support import require

# Server databases the suite expects (CI provides them); override to point elsewhere.
SERVER_DATABASES = {
    "postgresql": os.environ.get(
        "LLMESH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mysql": os.environ.get("LLMESH_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}

MODELS = (
    ModelConfig(name="tiny-llama", aliases=("tiny",), description="a tiny test model", max_output_tokens=256),
    ModelConfig(
        name="qwen2-0.5b-instruct",
        aliases=("qwen2",),
        version="v2",
        cost_per_1k_tokens=0.5,
        templates=(TemplateConfig(name="qa", system_prompt="Answer briefly.", user_template="Q: {input}"),),
    ),
)


def _server_database(kind: str) -> Iterator[str]:
    """A database of its own for this test session on a PostgreSQL or MySQL server (dropped after)."""
    admin_url = SERVER_DATABASES[kind]
    name = f"llmesh_registry_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.OperationalError as e:
        admin.dispose()
        shown = make_url(admin_url).render_as_string(hide_password=True)
        env = "LLMESH_TEST_POSTGRES_URL" if kind == "postgresql" else "LLMESH_TEST_MYSQL_URL"
        first_line = str(e.orig or e).splitlines()[0]
        require(False, f"{kind} is not reachable at {shown} ({first_line}); start it or set {env}")
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if kind == "postgresql" else ""
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}{force}"))
        admin.dispose()


@pytest.fixture(scope="session")
def postgresql_database() -> Iterator[str]:
    """A per-session PostgreSQL database."""
    yield from _server_database("postgresql")


@pytest.fixture(scope="session")
def mysql_database() -> Iterator[str]:
    """A per-session MySQL/MariaDB database."""
    yield from _server_database("mysql")


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A clean catalog database URL on each backend (catalog tables dropped before each test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('catalog')}/llmesh.db"
    url: str = request.getfixturevalue(f"{request.param}_database")
    drop_registry_tables(url)
    return url


def drop_registry_tables(url: str) -> None:
    """Drop the registry's tables and its migration history (the next start migrates from scratch)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        metadata.drop_all(conn)
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))
    engine.dispose()


@pytest.fixture
def models() -> tuple[ModelConfig, ...]:
    """The config models every test registry starts with."""
    return MODELS


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    """A fresh SQLite catalog for tests that do not care about the backend."""
    return f"sqlite:///{tmp_path}/llmesh.db"


RegistryFactory = Callable[..., Awaitable[tuple[RunningServer, registry_grpc.RegistryServiceStub]]]


@pytest.fixture
async def make_registry(sqlite_url: str) -> AsyncIterator[RegistryFactory]:
    """Start registries (stopped at the end); returns the server and a stub dialling it."""
    started: list[tuple[RunningServer, grpc.aio.Channel]] = []

    async def make(
        *,
        database_url: str = sqlite_url,
        listen: str = "127.0.0.1:0",
        ttl: float = 10.0,
        interval: float = 0.1,
        models: tuple[ModelConfig, ...] = MODELS,
        supervisor_address: str = "",
    ) -> tuple[RunningServer, registry_grpc.RegistryServiceStub]:
        config = RegistryServiceConfig(
            supervisor_address=supervisor_address,
            listen=listen,
            database_url=database_url,
            heartbeat_ttl_seconds=ttl,
            heartbeat_interval_seconds=interval,
            models=models,
        )
        running = await start_registry(config)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, registry_grpc.RegistryServiceStub(channel)

    yield make
    for running, channel in started:
        await channel.close(None)
        await running.stop(None)
