"""The real RegistryService (SQLite catalog) behind a real Envoy: its REST routes as implemented now."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from llmesh.common.config import ModelConfig
from llmesh.common.server import RunningServer
from llmesh.edge import EnvoyProcess
from llmesh.registry.server import RegistryServiceConfig, start_registry
from llmesh.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from tests.edge.edge_http import assert_openai_error, closed_port, edge_settings, request
from tests.edge.edge_standins import wait_until

pytestmark = pytest.mark.envoy

MODELS = (ModelConfig(name="tiny-llama", aliases=("tiny",), max_model_len=2048),)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunningServer]:
    config = RegistryServiceConfig(
        listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path}/catalog.db", models=MODELS
    )
    running = await start_registry(config)
    yield running
    await running.stop(None)


@pytest.fixture
async def edge_registry(
    registry: RunningServer, descriptor_path: Path, envoy_bin: Path, tmp_path: Path
) -> AsyncIterator[EnvoyProcess]:
    addresses = {name: f"127.0.0.1:{closed_port()}" for name in ("auth", "scheduler")}
    settings = edge_settings(descriptor_path, {**addresses, "registry": f"127.0.0.1:{registry.port}"})
    async with EnvoyProcess(settings, tmp_path / "envoy", envoy_bin=envoy_bin) as envoy:

        async def healthy() -> bool:
            return (await request(envoy, "GET", "/v1/registry/models")).status_code == 200

        await wait_until(healthy, timeout_s=15)
        yield envoy


async def test_models_over_rest(edge_registry: EnvoyProcess) -> None:
    listed = (await request(edge_registry, "GET", "/v1/registry/models")).json()
    (model,) = listed["models"]
    assert model["name"] == "tiny-llama" and model["aliases"] == ["tiny"]
    response = await request(edge_registry, "GET", "/v1/registry/models/tiny")
    assert response.status_code == 200
    assert response.json()["model"]["name"] == "tiny-llama"


async def test_unknown_model_is_404(edge_registry: EnvoyProcess) -> None:
    response = await request(edge_registry, "GET", "/v1/registry/models/nope")
    error = assert_openai_error(response, 404, "not_found_error")
    assert error["code"] == "NOT_FOUND"
    assert "known models and aliases" in error["message"]


async def test_workers_over_rest(edge_registry: EnvoyProcess) -> None:
    response = await request(edge_registry, "GET", "/v1/registry/workers")
    assert response.status_code == 200
    assert response.json() == {"workers": []}
    response = await request(edge_registry, "POST", "/v1/registry/workers/worker-9:drain", json_body={})
    assert_openai_error(response, 404, "not_found_error")


async def test_openai_model_catalog_is_served_by_the_registry(edge_registry: EnvoyProcess) -> None:
    """ModelService's catalog reads go to the registry (no worker, no gateway needed)."""
    listed = await request(edge_registry, "GET", "/v1/models")
    assert listed.status_code == 200, listed.text
    assert listed.json()["object"] == "list"
    (card,) = listed.json()["data"]
    assert card["id"] == "tiny-llama" and card["object"] == "model" and card["aliases"] == ["tiny"]
    response = await request(edge_registry, "GET", "/v1/models/tiny")  # by alias
    assert response.status_code == 200 and response.json()["id"] == "tiny-llama"
    error = assert_openai_error(
        await request(edge_registry, "GET", "/v1/models/nope"), 404, "not_found_error"
    )
    assert "nope" in error["message"]


async def test_catalog_writes_over_rest(edge_registry: EnvoyProcess) -> None:
    response = await request(edge_registry, "POST", "/v1/registry/models", json_body={"name": "other"})
    assert response.status_code == 200, response.text
    assert response.json()["model"]["name"] == "other"
    response = await request(edge_registry, "GET", "/v1/registry/models/other")
    assert response.status_code == 200 and response.json()["model"]["name"] == "other"
    listed = (await request(edge_registry, "GET", "/v1/models")).json()
    assert {card["id"] for card in listed["data"]} == {"tiny-llama", "other"}


async def test_native_grpc_reaches_the_registry(edge_registry: EnvoyProcess) -> None:
    async with grpc.aio.insecure_channel(edge_registry.grpc_target) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        reply = await stub.GetModel(registry_service_pb2.GetModelRequest(name="tiny"), timeout=10)
    assert reply.model.name == "tiny-llama"


async def test_registry_going_away_is_503(edge_registry: EnvoyProcess, registry: RunningServer) -> None:
    await registry.stop(None)  # health NOT_SERVING, then the port closes

    async def unavailable() -> bool:
        return (await request(edge_registry, "GET", "/v1/registry/models")).status_code == 503

    await wait_until(unavailable, timeout_s=15)
    response = await request(edge_registry, "GET", "/v1/registry/models")
    assert_openai_error(response, 503, "server_error")
