"""The catalog accepts exactly the engines a worker can build (one list: the worker's factory's)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from llmesh.registry import model_spec
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.worker import engine_factory


def test_the_catalog_and_the_worker_share_one_engine_list() -> None:
    assert model_spec.ENGINES is engine_factory.ENGINES
    assert {"vllm", "vllm-embed", "openai", "anthropic", "llamacpp"} <= set(model_spec.ENGINES)


@pytest.mark.parametrize("engine", engine_factory.ENGINES)
async def test_create_model_takes_every_worker_engine(make_registry: Any, engine: str) -> None:
    _, stub = await make_registry()
    created = await stub.CreateModel(
        registry_pb2.CreateModelRequest(
            model=registry_pb2.Model(name=f"m-{engine}", engine=registry_pb2.EngineSettings(engine=engine))
        )
    )
    assert created.model.engine.engine == engine
    exported = await stub.ExportModels(registry_pb2.ExportModelsRequest())
    assert f"engine: {engine}\n" in exported.yaml


async def test_an_engine_no_worker_has_is_refused_by_name(make_registry: Any) -> None:
    _, stub = await make_registry()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateModel(
            registry_pb2.CreateModelRequest(
                model=registry_pb2.Model(name="m", engine=registry_pb2.EngineSettings(engine="tgi"))
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.engine.engine 'tgi' is not one of" in (err.value.details() or "")
    assert "'anthropic'" in (err.value.details() or "")
