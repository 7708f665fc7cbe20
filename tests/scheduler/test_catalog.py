"""The picker's catalog cache against a real registry: an aged answer is served at once and
refreshed behind the request; a model the registry retired stops resolving after that refresh."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from llmesh.common.config import ModelConfig
from llmesh.common.errors import NotFound
from llmesh.common.server import RunningServer
from llmesh.registry.server import RegistryServiceConfig, start_registry
from llmesh.registry.v1 import registry_service_pb2 as registry_pb
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.scheduler.catalog import ModelCatalog

ADMIN = (("x-llmesh-role", "admin"), ("x-llmesh-user", "alice"))


class CountingRegistry:
    """The real registry's stub, counting the GetModel calls the catalog makes."""

    def __init__(self, stub: registry_grpc.RegistryServiceStub) -> None:
        self._stub = stub
        self.get_model_calls = 0

    async def GetModel(
        self, request: registry_pb.GetModelRequest, timeout: float
    ) -> registry_pb.GetModelResponse:
        self.get_model_calls += 1
        return await self._stub.GetModel(request, timeout=timeout)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, registry_grpc.RegistryServiceStub]]:
    server = await start_registry(
        RegistryServiceConfig(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path}/llmesh.db",
            models=(ModelConfig(name="tiny-llama", aliases=("tiny",)), ModelConfig(name="other")),
        )
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, registry_grpc.RegistryServiceStub(channel)
    await server.stop(None)


async def _refreshed(catalog: ModelCatalog) -> None:
    """Until the background refreshes the last reads started have ended."""
    async with asyncio.timeout(5):
        await asyncio.gather(*list(catalog._refreshing.values()))


async def test_an_aged_answer_is_served_at_once_and_refreshed_behind_the_request(registry) -> None:
    _, stub = registry
    counting = CountingRegistry(stub)
    catalog = ModelCatalog(counting, ttl_s=0.0)  # type: ignore[arg-type]
    assert (await catalog.resolve("tiny")).name == "tiny-llama"
    assert counting.get_model_calls == 1  # a name never seen waits for the registry
    # Aged at once (ttl 0): the cached answer comes back and one refresh starts in the background.
    assert (await catalog.resolve("tiny")).name == "tiny-llama"
    assert (await catalog.resolve("tiny")).name == "tiny-llama"
    await _refreshed(catalog)
    assert counting.get_model_calls == 2  # one refresh for both aged reads


async def test_a_retired_model_stops_resolving_once_its_refresh_says_so(registry) -> None:
    _, stub = registry
    counting = CountingRegistry(stub)
    catalog = ModelCatalog(counting, ttl_s=0.0)  # type: ignore[arg-type]
    assert (await catalog.resolve("other")).name == "other"
    await stub.DeleteModel(registry_pb.DeleteModelRequest(name="other"), metadata=ADMIN)
    # The request that finds the answer aged still gets it; its refresh learns the model is gone.
    assert (await catalog.resolve("other")).name == "other"
    await _refreshed(catalog)
    with pytest.raises(NotFound):
        await catalog.resolve("other")


async def test_a_known_model_keeps_resolving_while_the_registry_is_down(registry) -> None:
    server, stub = registry
    counting = CountingRegistry(stub)
    catalog = ModelCatalog(counting, ttl_s=0.0)  # type: ignore[arg-type]
    assert (await catalog.resolve("tiny")).name == "tiny-llama"
    await server.stop(None)
    assert (await catalog.resolve("tiny")).name == "tiny-llama"
    await _refreshed(catalog)  # the refresh failed: the answer stays
    assert counting.get_model_calls == 2
    assert (await catalog.resolve("tiny")).name == "tiny-llama"
