"""A model's vLLM tool parser (`engine.tool_parser`) in the catalog: created, read, updated with
etags, exported and imported byte for byte, seeded from the config, and refused by name when vLLM
has no such parser or the engine cannot use one. The names come from vLLM's own registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
import yaml

from llmesh.common.config import ConfigError, ModelConfig
from llmesh.common.errors import InvalidRequest
from llmesh.registry.schema import models_table
from llmesh.registry.server import RegistryServiceConfig
from llmesh.registry.tool_parsers import check_tool_parser, vllm_tool_parsers
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

ADMIN = (("x-llmesh-role", "admin"), ("x-llmesh-user", "alice"))
S = registry_pb2
NAME = "hermes-tools"


def tools_model(parser: str, engine: str = "vllm") -> registry_pb2.Model:
    return S.Model(
        name=NAME, engine=S.EngineSettings(engine=engine, source="NousResearch/Hermes-3", tool_parser=parser)
    )


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def test_the_accepted_names_are_vllms_tool_parsers() -> None:
    from vllm.tool_parsers import ToolParserManager

    known = vllm_tool_parsers()
    assert known == tuple(sorted({*ToolParserManager.tool_parsers, *ToolParserManager.lazy_parsers}))
    assert {"hermes", "llama3_json", "mistral"} <= set(known)


def test_without_vllm_any_identifier_like_name_is_accepted() -> None:
    # A control-plane install (known=None): the worker that loads the model checks the name.
    assert check_tool_parser("my_parser-2", "vllm", None, "model.engine.tool_parser") == "my_parser-2"
    with pytest.raises(InvalidRequest, match=r"model\.engine\.tool_parser 'two words' is not a tool parser"):
        check_tool_parser("two words", "vllm", None, "model.engine.tool_parser")
    with pytest.raises(InvalidRequest, match=r"engine 'openai' cannot use a tool parser"):
        check_tool_parser("hermes", "openai", None, "model.engine.tool_parser")


async def test_create_get_update_and_audit(db_url: str, make_registry: Any) -> None:
    _, stub = await make_registry(database_url=db_url)
    created = (
        await stub.CreateModel(S.CreateModelRequest(model=tools_model("hermes")), metadata=ADMIN)
    ).model
    assert created.engine.tool_parser == "hermes"
    got = (await stub.GetModel(S.GetModelRequest(name=NAME))).model
    assert got.engine.tool_parser == "hermes" and got.etag == created.etag

    # A masked update of the parser moves the etag on and leaves the other engine settings.
    change = S.Model(name=NAME, engine=S.EngineSettings(tool_parser="llama3_json"))
    updated = (
        await stub.UpdateModel(
            S.UpdateModelRequest(model=change, update_mask=["engine.tool_parser"], etag=got.etag),
            metadata=ADMIN,
        )
    ).model
    assert updated.engine.tool_parser == "llama3_json" and updated.engine.source == "NousResearch/Hermes-3"
    assert updated.etag != got.etag

    # The old etag is stale now: ABORTED, nothing written.
    stale = S.Model(name=NAME, engine=S.EngineSettings(tool_parser="mistral"))
    err = await rpc_error(
        stub.UpdateModel(
            S.UpdateModelRequest(model=stale, update_mask=["engine.tool_parser"], etag=got.etag),
            metadata=ADMIN,
        )
    )
    assert err.code() == grpc.StatusCode.ABORTED and "etag" in err.details()
    assert (await stub.GetModel(S.GetModelRequest(name=NAME))).model.engine.tool_parser == "llama3_json"

    # An empty mask takes the fields the request set; masking the field with "" clears it.
    await stub.UpdateModel(S.UpdateModelRequest(model=stale), metadata=ADMIN)
    assert (await stub.GetModel(S.GetModelRequest(name=NAME))).model.engine.tool_parser == "mistral"
    cleared = (
        await stub.UpdateModel(
            S.UpdateModelRequest(model=S.Model(name=NAME), update_mask=["engine.tool_parser"]),
            metadata=ADMIN,
        )
    ).model
    assert cleared.engine.tool_parser == ""

    audit = (await stub.ListAuditEvents(S.ListAuditEventsRequest(model=NAME), metadata=ADMIN)).events
    parsers = [json.loads(e.after_json)["engine"]["tool_parser"] for e in reversed(audit)]
    assert parsers == ["hermes", "llama3_json", "mistral", ""]


async def test_an_unknown_parser_is_refused_listing_vllms(make_registry: Any) -> None:
    # More bad tool parsers are in test_registry_admin.py's test_bad_catalog_input_names_the_field.
    _, stub = await make_registry()
    err = await rpc_error(stub.CreateModel(S.CreateModelRequest(model=tools_model("hermez")), metadata=ADMIN))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("model.engine.tool_parser 'hermez' is not one of vLLM's tool parsers")
    known = vllm_tool_parsers()
    assert known and all(repr(name) in err.details() for name in known)
    assert NAME not in [m.name for m in (await stub.ListModels(S.ListModelsRequest())).models]


async def test_an_engine_change_that_cannot_use_the_parser_is_refused(make_registry: Any) -> None:
    _, stub = await make_registry()
    await stub.CreateModel(S.CreateModelRequest(model=tools_model("hermes")), metadata=ADMIN)
    err = await rpc_error(
        stub.UpdateModel(
            S.UpdateModelRequest(
                model=S.Model(name=NAME, engine=S.EngineSettings(engine="openai")),
                update_mask=["engine.engine"],
            ),
            metadata=ADMIN,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.engine.tool_parser 'hermes': engine 'openai' cannot use" in err.details()
    assert (await stub.GetModel(S.GetModelRequest(name=NAME))).model.engine.engine == "vllm"


MODELS_YAML = """
models:
- name: hermes-tools
  engine: {source: NousResearch/Hermes-3, tool_parser: hermes, chat_template: "{{ messages }}"}
- name: llama-tools
  path: meta-llama/Llama-3.1-8B-Instruct
  tool_parser: llama3_json
- name: plain
  path: Qwen/Qwen2-0.5B-Instruct
"""


async def test_export_import_round_trips_the_parser(db_url: str, make_registry: Any, tmp_path: Path) -> None:
    _, stub = await make_registry(database_url=db_url, models=())
    await stub.ImportModels(S.ImportModelsRequest(yaml=MODELS_YAML), metadata=ADMIN)
    exported = (await stub.ExportModels(S.ExportModelsRequest(), metadata=ADMIN)).yaml
    engines = {m["name"]: m["engine"] for m in yaml.safe_load(exported)["models"]}
    assert {name: e["tool_parser"] for name, e in engines.items()} == {
        "hermes-tools": "hermes",
        "llama-tools": "llama3_json",
        "plain": "",
    }
    assert list(engines["plain"]).index("tool_parser") == list(engines["plain"]).index("upstream_model") + 1

    again = await stub.ImportModels(S.ImportModelsRequest(yaml=exported), metadata=ADMIN)
    assert len(again.unchanged) == 3 and not again.updated and not again.created
    _, other = await make_registry(database_url=f"sqlite:///{tmp_path}/restore.db", models=())
    await other.ImportModels(S.ImportModelsRequest(yaml=exported), metadata=ADMIN)
    assert (await other.ExportModels(S.ExportModelsRequest(), metadata=ADMIN)).yaml == exported

    changed = exported.replace("tool_parser: llama3_json", "tool_parser: pythonic")
    result = await stub.ImportModels(S.ImportModelsRequest(yaml=changed), metadata=ADMIN)
    assert list(result.updated) == ["llama-tools@v1"]
    assert (await stub.GetModel(S.GetModelRequest(name="llama-tools"))).model.engine.tool_parser == "pythonic"


async def test_config_models_seed_the_parser(db_url: str, make_registry: Any) -> None:
    models = (ModelConfig(name=NAME, path="/models/hermes", tool_parser="hermes"), ModelConfig(name="plain"))
    _, stub = await make_registry(database_url=db_url, models=models)
    assert (await stub.GetModel(S.GetModelRequest(name=NAME))).model.engine.tool_parser == "hermes"
    assert (await stub.GetModel(S.GetModelRequest(name="plain"))).model.engine.tool_parser == ""

    bad = ModelConfig(name=NAME, engine="openai", base_url="http://127.0.0.1:1", tool_parser="hermes")
    with pytest.raises(ConfigError, match=rf"models\.{NAME}\.engine\.tool_parser 'hermes': engine 'openai'"):
        RegistryServiceConfig(listen="127.0.0.1:0", database_url="sqlite://", models=(bad,))
    with pytest.raises(ConfigError, match=rf"models\.{NAME}\.engine\.tool_parser 'hermez' is not one of"):
        RegistryServiceConfig(
            listen="127.0.0.1:0",
            database_url="sqlite://",
            models=(ModelConfig(name=NAME, tool_parser="hermez"),),
        )


async def test_rows_stored_before_the_field_read_as_no_parser(db_url: str, make_registry: Any) -> None:
    # The engine settings are one JSON column: a row an older registry wrote has no tool_parser key.
    # It reads as "" and the config seed finds it unchanged, so no migration rewrites old rows.
    models = (ModelConfig(name="plain", path="/models/plain"),)
    running, _ = await make_registry(database_url=db_url, models=models)
    await running.stop(None)
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        stored = conn.execute(sa.select(models_table.c.id, models_table.c.engine)).one()
        old = {k: v for k, v in stored.engine.items() if k != "tool_parser"}
        conn.execute(sa.update(models_table).where(models_table.c.id == stored.id).values(engine=old))
    engine.dispose()

    _, stub = await make_registry(database_url=db_url, models=models)
    got = (await stub.GetModel(S.GetModelRequest(name="plain"))).model
    assert got.engine.tool_parser == "" and got.engine.source == "/models/plain"
    audit = (await stub.ListAuditEvents(S.ListAuditEventsRequest(model="plain"), metadata=ADMIN)).events
    assert [e.action for e in audit] == ["import"]  # the first seed only
