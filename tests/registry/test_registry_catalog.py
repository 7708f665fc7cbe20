"""The catalog on SQLite, PostgreSQL and MySQL: config upserts, reads by name and alias."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import pytest

from llmesh.common.config import ConfigError, LlmeshConfig, ModelConfig, RegistryConfig
from llmesh.common.errors import DependencyDown
from llmesh.registry.catalog import Catalog
from llmesh.registry.server import RegistryServiceConfig, start_registry
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2


@pytest.fixture
def catalog(db_url: str):
    catalog = Catalog.from_url(db_url)
    catalog.create_schema()
    yield catalog
    catalog.dispose()


def test_config_models_are_upserted_and_read_back(catalog: Catalog, models: Any) -> None:
    catalog.upsert_config_models(models)
    models = catalog.list_models()
    assert [(m.name, m.version) for m in models] == [("qwen2-0.5b-instruct", "v2"), ("tiny-llama", "v1")]
    qwen = catalog.get_model("qwen2")
    assert qwen is not None and qwen.name == "qwen2-0.5b-instruct"
    assert qwen.aliases == ("qwen2",)
    assert qwen.templates == (
        {"name": "qa", "system_prompt": "Answer briefly.", "user_template": "Q: {input}"},
    )
    assert qwen.cost_per_1k_tokens == 0.5
    assert qwen.created_at.tzinfo is not None
    assert catalog.get_model("nope") is None
    assert catalog.known_names() == ["qwen2", "qwen2-0.5b-instruct", "tiny", "tiny-llama"]
    assert catalog.resolve_names(["tiny", "tiny-llama", "gpt-5"]) == (
        {"tiny": "tiny-llama", "tiny-llama": "tiny-llama"},
        ["gpt-5"],
    )


def test_config_wins_on_restart(catalog: Catalog, models: Any) -> None:
    MODELS = models
    catalog.upsert_config_models(MODELS)
    created = catalog.get_model("tiny-llama").created_at  # type: ignore[union-attr]
    changed = dataclasses.replace(MODELS[0], description="changed", aliases=("tl",), max_model_len=4096)
    catalog.upsert_config_models((changed, MODELS[1]))
    tiny = catalog.get_model("tl")
    assert tiny is not None and tiny.description == "changed" and tiny.aliases == ("tl",)
    assert tiny.engine["max_model_len"] == 4096
    assert tiny.created_at == created
    assert catalog.get_model("tiny") is None  # the old alias is gone
    # A new version in the config sits beside the old one (canaries made by API survive restarts);
    # reads by name get the newest; retiring is an explicit DeleteModel.
    catalog.upsert_config_models((dataclasses.replace(changed, version="v2"),))
    assert [(m.name, m.version) for m in catalog.list_models() if m.name == "tiny-llama"] == [
        ("tiny-llama", "v1"),
        ("tiny-llama", "v2"),
    ]
    assert catalog.get_model("tl").version == "v2"  # type: ignore[union-attr]
    # Upserting the same config again writes nothing (no new revision, no audit row).
    before = (catalog.get_model("tl").etag, len(catalog.audit_events()))  # type: ignore[union-attr]
    catalog.upsert_config_models((dataclasses.replace(changed, version="v2"),))
    assert (catalog.get_model("tl").etag, len(catalog.audit_events())) == before  # type: ignore[union-attr]


def test_colliding_config_is_rejected(models: Any) -> None:
    MODELS = models
    catalog = Catalog.from_url("sqlite://")
    with pytest.raises(ConfigError, match="alias 'tiny-llama' is already the name"):
        catalog.upsert_config_models((MODELS[0], ModelConfig(name="other", aliases=("tiny-llama",))))
    with pytest.raises(ConfigError, match="duplicate model name"):
        catalog.upsert_config_models((MODELS[0], MODELS[0]))


async def test_list_and_get_over_grpc(db_url: str, make_registry: Any) -> None:
    _, stub = await make_registry(database_url=db_url)
    listed = await stub.ListModels(registry_pb2.ListModelsRequest())
    assert [m.name for m in listed.models] == ["qwen2-0.5b-instruct", "tiny-llama"]
    assert all(m.ready_workers == 0 for m in listed.models)
    assert (await stub.ListModels(registry_pb2.ListModelsRequest(only_ready=True))).models == []

    await stub.RegisterWorker(
        registry_pb2.RegisterWorkerRequest(
            worker=registry_pb2.Worker(worker_id="w1", address="127.0.0.1:7001", models=["tiny"])
        )
    )
    ready = await stub.ListModels(registry_pb2.ListModelsRequest(only_ready=True))
    assert [(m.name, m.ready_workers, m.status) for m in ready.models] == [
        ("tiny-llama", 1, registry_pb2.MODEL_STATUS_READY)
    ]
    got = (await stub.GetModel(registry_pb2.GetModelRequest(name="qwen2"))).model
    assert got.name == "qwen2-0.5b-instruct" and got.version == "v2" and list(got.aliases) == ["qwen2"]
    assert got.templates[0].user_template == "Q: {input}"
    assert got.engine.max_model_len == 2048 and got.created_at.seconds > 0

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetModel(registry_pb2.GetModelRequest(name="gpt-5"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'gpt-5' not found" in err.value.details() and "tiny-llama" in err.value.details()


async def test_unreachable_database_fails_start_with_the_url(models: Any) -> None:
    config = RegistryServiceConfig(
        listen="127.0.0.1:0",
        database_url="postgresql+psycopg://llmesh:secret@127.0.0.1:1/catalog",
        models=models,
    )
    with pytest.raises(DependencyDown, match=r"on postgresql\+psycopg://llmesh:\*\*\*@127.0.0.1:1/catalog"):
        await start_registry(config)


def test_config_from_the_platform_config(models: Any) -> None:
    cfg = LlmeshConfig(
        models=models, registry=RegistryConfig(heartbeat_interval_seconds=3, heartbeat_ttl_seconds=9)
    )
    config = RegistryServiceConfig.from_config(cfg, listen="127.0.0.1:0", database_url="sqlite:///x.db")
    assert (config.heartbeat_interval_seconds, config.heartbeat_ttl_seconds, config.models) == (3, 9, models)
    with pytest.raises(ConfigError, match="database_url is empty"):
        RegistryServiceConfig.from_config(cfg, listen="127.0.0.1:0", database_url="")
    with pytest.raises(ConfigError, match="must be below heartbeat_ttl_seconds"):
        RegistryServiceConfig(
            listen=":0", database_url="sqlite://", heartbeat_interval_seconds=5, heartbeat_ttl_seconds=5
        )
