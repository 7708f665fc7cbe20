"""Fixtures of the edge tests: the descriptor set, the Envoy binary, stand-ins for the control-plane
upstreams and an Envoy (started by EnvoyProcess on free ports) in front of them.

Inference goes through the endpoint picker to workers; tests of it use `stack_factory(...,
edge=True)` (tests/scripted_stack.py): the real registry, scheduler, workers and Envoy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmesh.edge import EnvoyProcess, find_envoy
from llmesh.edge.descriptor import default_descriptor_path
from llmesh.edge.settings import SERVICE_NAMES
from llmesh.edge.validate import EnvoyNotFound
from tests.edge.edge_http import closed_port, edge_settings
from tests.edge.edge_standins import StandIn, start_standin
from tests.support import grpcurl_path, require


@pytest.fixture(scope="session")
def descriptor_path() -> Path:
    path = default_descriptor_path()
    require(path.is_file(), "gen/llmesh/llmesh_descriptor.pb is missing; run `make gen`")
    return path


@pytest.fixture(scope="session")
def envoy_bin() -> Path:
    try:
        return find_envoy()
    except EnvoyNotFound as error:
        require(False, str(error))
        raise


@pytest.fixture(scope="session")
def grpcurl_bin() -> str:
    return grpcurl_path()


@pytest.fixture(scope="session")
async def standins() -> AsyncIterator[dict[str, StandIn]]:
    """One stand-in server per control-plane upstream, SERVING."""
    servers = {name: await start_standin(name) for name in SERVICE_NAMES}
    yield servers
    for server in servers.values():
        await server.stop()


@pytest.fixture(scope="session")
async def edge(
    standins: dict[str, StandIn],
    descriptor_path: Path,
    envoy_bin: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[EnvoyProcess]:
    """Envoy in front of the stand-ins, shared by the session."""
    run_dir = tmp_path_factory.mktemp("edge")
    settings = edge_settings(
        descriptor_path, {name: s.address for name, s in standins.items()}, run_dir / "access.log"
    )
    async with EnvoyProcess(settings, run_dir, envoy_bin=envoy_bin) as envoy:
        yield envoy


@pytest.fixture
async def edge_without_upstreams(
    descriptor_path: Path, envoy_bin: Path, tmp_path: Path
) -> AsyncIterator[EnvoyProcess]:
    """Envoy whose upstreams are all down (nothing listens on their ports): the control-plane
    services, and so the endpoint picker and the workers' EDS too."""
    settings = edge_settings(descriptor_path, {name: f"127.0.0.1:{closed_port()}" for name in SERVICE_NAMES})
    async with EnvoyProcess(settings, tmp_path, envoy_bin=envoy_bin) as envoy:
        yield envoy
