"""Catalog writes over gRPC on SQLite, PostgreSQL and MySQL: create, update with etags, the
lifecycle, retire, aliases, traffic weights, admin-only access and the audit table."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

from llmesh.common.v1 import common_pb2
from llmesh.registry.traffic_watch import TrafficWatch
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

ADMIN = (("x-llmesh-role", "admin"), ("x-llmesh-user", "alice"))
BOB = (("x-llmesh-role", "admin"), ("x-llmesh-user", "bob"))
USER = (("x-llmesh-role", "user"), ("x-llmesh-user", "mallory"))
S = registry_pb2


def llama(version: str = "v1", **fields: Any) -> registry_pb2.Model:
    return S.Model(
        name="llama3-8b-instruct",
        version=version,
        aliases=["llama3"],
        description="Llama 3 8B",
        engine=S.EngineSettings(
            engine="vllm", source="meta-llama/Meta-Llama-3-8B-Instruct", max_model_len=8192
        ),
        limits=S.ModelLimits(max_output_tokens=2048, max_prompt_tokens=6144),
        default_sampling=common_pb2.SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
        templates=[S.ScenarioTemplate(name="qa", system_prompt="Answer.", user_template="Q: {input}")],
        cost_per_1k_tokens=0.2,
        labels={"family": "llama", "license": "llama3"},
        **fields,
    )


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_create_get_update_retire_with_audit(db_url: str, make_registry: Any) -> None:
    _, stub = await make_registry(database_url=db_url)
    created = (await stub.CreateModel(S.CreateModelRequest(model=llama()), metadata=ADMIN)).model
    assert (created.name, created.version, created.status) == (
        "llama3-8b-instruct",
        "v1",
        S.MODEL_STATUS_REGISTERED,
    )
    assert created.etag and list(created.aliases) == ["llama3"]
    got = (await stub.GetModel(S.GetModelRequest(name="llama3"))).model
    assert (
        got.engine.max_model_len == 8192
        and got.engine.dtype == "auto"
        and got.engine.tensor_parallel_size == 1
    )
    assert round(got.default_sampling.temperature, 3) == 0.7 and dict(got.labels)["family"] == "llama"
    assert got.limits.max_prompt_tokens == 6144 and got.templates[0].name == "qa"

    # A masked update changes that field only and moves the etag on.
    updated = (
        await stub.UpdateModel(
            S.UpdateModelRequest(
                model=S.Model(name="llama3-8b-instruct", engine=S.EngineSettings(max_model_len=4096)),
                update_mask=["engine.max_model_len"],
                etag=got.etag,
            ),
            metadata=ADMIN,
        )
    ).model
    assert updated.engine.max_model_len == 4096 and updated.engine.source == got.engine.source
    assert updated.etag != got.etag and updated.description == "Llama 3 8B"

    # The lifecycle: registered -> deploying -> ready; ready cannot be retired before draining.
    for status in (S.MODEL_STATUS_DEPLOYING, S.MODEL_STATUS_READY):
        updated = (
            await stub.UpdateModel(
                S.UpdateModelRequest(
                    model=S.Model(name="llama3-8b-instruct", status=status), update_mask=["status"]
                ),
                metadata=ADMIN,
            )
        ).model
        assert updated.status == status
    err = await rpc_error(stub.DeleteModel(S.DeleteModelRequest(name="llama3-8b-instruct"), metadata=ADMIN))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot go from ready to retired" in err.details() and "draining" in err.details()
    err = await rpc_error(
        stub.UpdateModel(
            S.UpdateModelRequest(model=S.Model(name="llama3-8b-instruct", status=S.MODEL_STATUS_REGISTERED)),
            metadata=ADMIN,
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "model.status" in err.details()
    await stub.UpdateModel(
        S.UpdateModelRequest(model=S.Model(name="llama3-8b-instruct", status=S.MODEL_STATUS_DRAINING)),
        metadata=BOB,
    )
    retired = (await stub.DeleteModel(S.DeleteModelRequest(name="llama3-8b-instruct"), metadata=ADMIN)).models
    assert [(m.version, m.status) for m in retired] == [("v1", S.MODEL_STATUS_RETIRED)]
    err = await rpc_error(stub.GetModel(S.GetModelRequest(name="llama3")))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # the alias went with the last live version
    listed = await stub.ListModels(S.ListModelsRequest(include_retired=True))
    assert ("llama3-8b-instruct", S.MODEL_STATUS_RETIRED) in [(m.name, m.status) for m in listed.models]

    # Every change is in the audit table: who, what, before and after.
    audit = (
        await stub.ListAuditEvents(S.ListAuditEventsRequest(model="llama3-8b-instruct"), metadata=ADMIN)
    ).events
    actions = [(e.actor, e.action) for e in reversed(audit)]
    assert actions == [
        ("alice", "create"),
        ("alice", "update"),
        ("alice", "update"),
        ("alice", "update"),
        ("bob", "update"),
        ("alice", "delete"),
        ("alice", "set_alias"),
    ]
    create, resize = audit[-1], audit[-2]
    assert create.before_json == "" and json.loads(create.after_json)["engine"]["max_model_len"] == 8192
    assert json.loads(resize.before_json)["engine"]["max_model_len"] == 8192
    assert json.loads(resize.after_json)["engine"]["max_model_len"] == 4096
    assert all(e.at.seconds > 0 for e in audit)


async def test_concurrent_updates_with_one_etag_one_wins(db_url: str, make_registry: Any) -> None:
    _, stub = await make_registry(database_url=db_url)
    etag = (await stub.GetModel(S.GetModelRequest(name="tiny-llama"))).model.etag

    async def update(admin: tuple[tuple[str, str], ...], text: str) -> Any:
        try:
            return await stub.UpdateModel(
                S.UpdateModelRequest(model=S.Model(name="tiny-llama", description=text), etag=etag),
                metadata=admin,
            )
        except grpc.aio.AioRpcError as e:
            return e

    for round_ in range(3):
        etag = (await stub.GetModel(S.GetModelRequest(name="tiny-llama"))).model.etag
        results = await asyncio.gather(update(ADMIN, f"alice {round_}"), update(BOB, f"bob {round_}"))
        won = [r for r in results if isinstance(r, S.UpdateModelResponse)]
        lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert lost[0].code() == grpc.StatusCode.ABORTED and "changed" in lost[0].details()
        now = (await stub.GetModel(S.GetModelRequest(name="tiny-llama"))).model
        assert now.description == won[0].model.description and now.etag == won[0].model.etag
    # A stale etag is refused even without a race.
    err = await rpc_error(
        stub.UpdateModel(
            S.UpdateModelRequest(model=S.Model(name="tiny-llama", description="x"), etag=etag), metadata=ADMIN
        )
    )
    assert err.code() == grpc.StatusCode.ABORTED and "etag" in err.details()


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (S.CreateModelRequest(), "model is required"),
        (S.CreateModelRequest(model=S.Model(version="v1")), "model.name is required"),
        (
            S.CreateModelRequest(model=S.Model(name="m", version="v 1")),
            "model.version 'v 1' is not a valid version",
        ),
        (
            S.CreateModelRequest(model=S.Model(name="m", engine=S.EngineSettings(engine="tgi"))),
            "model.engine.engine 'tgi'",
        ),
        (
            S.CreateModelRequest(model=S.Model(name="m", engine=S.EngineSettings(dtype="int3"))),
            "model.engine.dtype 'int3'",
        ),
        (
            S.CreateModelRequest(
                model=S.Model(name="m", engine=S.EngineSettings(gpu_memory_utilization=1.5))
            ),
            "model.engine.gpu_memory_utilization is 1.5",
        ),
        (
            S.CreateModelRequest(
                model=S.Model(name="m", default_sampling=common_pb2.SamplingParams(temperature=3))
            ),
            "model.default_sampling.temperature is 3.0",
        ),
        (
            S.CreateModelRequest(
                model=S.Model(name="m", default_sampling=common_pb2.SamplingParams(top_p=0))
            ),
            "model.default_sampling.top_p is 0.0",
        ),
        (
            S.CreateModelRequest(model=S.Model(name="m", templates=[S.ScenarioTemplate(system_prompt="x")])),
            "model.templates[0].name is required",
        ),
        (
            S.CreateModelRequest(model=S.Model(name="m", templates=[S.ScenarioTemplate(name="qa")] * 2)),
            "model.templates[1].name 'qa' appears twice",
        ),
        (
            S.CreateModelRequest(model=S.Model(name="m", cost_per_1k_tokens=-1)),
            "model.cost_per_1k_tokens is -1.0",
        ),
        (S.CreateModelRequest(model=S.Model(name="m", labels={"bad key!": "x"})), "label key 'bad key!'"),
        (
            S.CreateModelRequest(model=S.Model(name="m", aliases=["m"])),
            "model.aliases[0] 'm' is the model's own name",
        ),
        (
            S.CreateModelRequest(model=S.Model(name="m", aliases=["tiny-llama"])),
            "model.aliases[0]: 'tiny-llama' is the name",
        ),
        (
            S.CreateModelRequest(model=S.Model(name="tiny")),
            "model.name 'tiny' is already an alias of 'tiny-llama'",
        ),
        (
            S.CreateModelRequest(model=S.Model(name="m", status=S.MODEL_STATUS_READY)),
            "model.status: a new model starts registered",
        ),
        (
            S.UpdateModelRequest(model=S.Model(name="tiny-llama"), update_mask=["colour"]),
            "update_mask[0]: unknown field 'colour'",
        ),
        (
            S.UpdateModelRequest(model=S.Model(name="tiny-llama"), update_mask=["name"]),
            "update_mask[0]: name selects",
        ),
        (S.UpdateModelRequest(model=S.Model(name="tiny-llama")), "update_mask: nothing to update"),
        (
            S.UpdateModelRequest(model=S.Model(name="tiny-llama"), update_mask=["engine.max_model_len"]),
            "model.engine.max_model_len is 0",
        ),
        (
            S.SetAliasRequest(alias="tiny-llama", model="qwen2-0.5b-instruct"),
            "alias: 'tiny-llama' is the name of a model",
        ),
        (
            S.SetTrafficWeightsRequest(name="tiny-llama", weights={"v9": 10}),
            "weights['v9']: model 'tiny-llama' has no live version",
        ),
        (S.SetTrafficWeightsRequest(name="tiny-llama", weights={"v1": 0}), "weights: at least one version"),
        (
            S.ImportModelsRequest(yaml="models: [{name: x, engine: {dtype: int3}}]"),
            "models[0].engine.dtype 'int3'",
        ),
        (
            S.ImportModelsRequest(yaml="models:\n- name: x\n  colour: red\n"),
            "models[0]: unknown key(s) ['colour']",
        ),
        (
            S.ImportModelsRequest(yaml="models: [{name: x}, {name: x}]"),
            "models[1]: x@v1 also appears as models[0]",
        ),
        (S.ImportModelsRequest(yaml="models: [: nope"), "yaml: not valid YAML"),
        (
            S.CreateModelRequest(model=S.Model(name="m", engine=S.EngineSettings(tool_parser="hermez"))),
            "model.engine.tool_parser 'hermez' is not one of vLLM's tool parsers [",
        ),
        (
            S.CreateModelRequest(
                model=S.Model(name="m", engine=S.EngineSettings(engine="openai", tool_parser="hermes"))
            ),
            "model.engine.tool_parser 'hermes': engine 'openai' cannot use a tool parser",
        ),
        (
            S.CreateModelRequest(
                model=S.Model(name="m", engine=S.EngineSettings(engine="vllm-embed", tool_parser="hermes"))
            ),
            "model.engine.tool_parser 'hermes': engine 'vllm-embed' cannot use a tool parser",
        ),
        (
            S.UpdateModelRequest(
                model=S.Model(name="tiny-llama", engine=S.EngineSettings(tool_parser="nope")),
                update_mask=["engine.tool_parser"],
            ),
            "model.engine.tool_parser 'nope' is not one of vLLM's tool parsers",
        ),
        (
            S.ImportModelsRequest(yaml="models: [{name: x, engine: {tool_parser: nope}}]"),
            "models[0].engine.tool_parser 'nope' is not one of vLLM's tool parsers",
        ),
        (
            S.ImportModelsRequest(yaml="models: [{name: x, engine: llamacpp, tool_parser: hermes}]"),
            "models[0].engine.tool_parser 'hermes': engine 'llamacpp' cannot use a tool parser",
        ),
    ],
)
async def test_bad_catalog_input_names_the_field(make_registry: Any, request_: Any, needle: str) -> None:
    _, stub = await make_registry()
    method = {
        S.CreateModelRequest: stub.CreateModel,
        S.UpdateModelRequest: stub.UpdateModel,
        S.SetAliasRequest: stub.SetAlias,
        S.SetTrafficWeightsRequest: stub.SetTrafficWeights,
        S.ImportModelsRequest: stub.ImportModels,
    }[type(request_)]
    err = await rpc_error(method(request_, metadata=ADMIN))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert needle in err.details(), err.details()


async def test_writes_need_the_admin_role(make_registry: Any) -> None:
    _, stub = await make_registry()
    writes = [
        stub.CreateModel(S.CreateModelRequest(model=llama()), metadata=USER),
        stub.UpdateModel(
            S.UpdateModelRequest(model=S.Model(name="tiny-llama", description="x")), metadata=USER
        ),
        stub.DeleteModel(S.DeleteModelRequest(name="tiny-llama"), metadata=USER),
        stub.SetAlias(S.SetAliasRequest(alias="t", model="tiny-llama"), metadata=USER),
        stub.SetTrafficWeights(
            S.SetTrafficWeightsRequest(name="tiny-llama", weights={"v1": 1}), metadata=USER
        ),
        stub.ImportModels(S.ImportModelsRequest(yaml="models: [{name: x}]"), metadata=USER),
        stub.ExportModels(S.ExportModelsRequest(), metadata=USER),
    ]
    for call in writes:
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs the admin role" in err.details() and "mallory" in err.details()
    assert (
        await stub.GetModel(S.GetModelRequest(name="tiny"), metadata=USER)
    ).model.description == "a tiny test model"
    audit = (await stub.ListAuditEvents(S.ListAuditEventsRequest(), metadata=ADMIN)).events
    assert {e.actor for e in audit} == {"config"}  # nothing the user tried was written


async def test_aliases_and_versions_with_traffic_weights(db_url: str, make_registry: Any) -> None:
    _, stub = await make_registry(database_url=db_url)
    await stub.CreateModel(S.CreateModelRequest(model=llama("v1")), metadata=ADMIN)
    canary = llama("v2")
    del canary.aliases[:]
    await stub.CreateModel(S.CreateModelRequest(model=canary), metadata=ADMIN)
    newest = (await stub.GetModel(S.GetModelRequest(name="llama3"))).model
    assert newest.version == "v2" and list(newest.aliases) == ["llama3"]  # aliases belong to the name
    assert (await stub.GetModel(S.GetModelRequest(name="llama3", version="v1"))).model.version == "v1"

    watch = stub.WatchTrafficWeights(S.WatchTrafficWeightsRequest())
    first = await asyncio.wait_for(watch.read(), 2)
    assert first.snapshot and list(first.splits) == []

    weights = await stub.SetTrafficWeights(
        S.SetTrafficWeightsRequest(name="llama3", weights={"v1": 90, "v2": 10}), metadata=ADMIN
    )
    assert dict(weights.weights) == {"v1": 90, "v2": 10}
    change = await asyncio.wait_for(watch.read(), 2)
    assert not change.snapshot
    assert [(s.model, dict(s.weights)) for s in change.splits] == [
        ("llama3-8b-instruct", {"v1": 90, "v2": 10})
    ]
    listed = await stub.ListTrafficWeights(S.ListTrafficWeightsRequest(model="llama3"))
    assert [(s.model, dict(s.weights)) for s in listed.splits] == [
        ("llama3-8b-instruct", {"v1": 90, "v2": 10})
    ]
    models = (await stub.ListModels(S.ListModelsRequest())).models
    assert {(m.version, m.traffic_weight) for m in models if m.name == "llama3-8b-instruct"} == {
        ("v1", 90),
        ("v2", 10),
    }

    # Rollback is one call; an empty map clears the split.
    await stub.SetTrafficWeights(
        S.SetTrafficWeightsRequest(name="llama3-8b-instruct", weights={"v1": 100}), metadata=ADMIN
    )
    change = await asyncio.wait_for(watch.read(), 2)
    assert [dict(s.weights) for s in change.splits] == [{"v1": 100}]
    await stub.SetTrafficWeights(S.SetTrafficWeightsRequest(name="llama3-8b-instruct"), metadata=ADMIN)
    change = await asyncio.wait_for(watch.read(), 2)
    assert [(s.model, dict(s.weights)) for s in change.splits] == [("llama3-8b-instruct", {})]
    watch.cancel()

    # SetAlias moves an alias; an empty model removes it; pointing at an alias is refused.
    await stub.SetAlias(S.SetAliasRequest(alias="llama3", model="tiny-llama"), metadata=ADMIN)
    assert (await stub.GetModel(S.GetModelRequest(name="llama3"))).model.name == "tiny-llama"
    err = await rpc_error(stub.SetAlias(S.SetAliasRequest(alias="x", model="tiny"), metadata=ADMIN))
    assert (
        err.code() == grpc.StatusCode.NOT_FOUND
        and "'tiny' is itself an alias of 'tiny-llama'" in err.details()
    )
    await stub.SetAlias(S.SetAliasRequest(alias="llama3"), metadata=ADMIN)
    assert (
        await rpc_error(stub.GetModel(S.GetModelRequest(name="llama3")))
    ).code() == grpc.StatusCode.NOT_FOUND

    # Creating a version that exists is ALREADY_EXISTS; retiring one version keeps the other.
    err = await rpc_error(stub.CreateModel(S.CreateModelRequest(model=canary), metadata=ADMIN))
    assert (
        err.code() == grpc.StatusCode.ALREADY_EXISTS
        and "llama3-8b-instruct@v2 already exists" in err.details()
    )
    await stub.DeleteModel(S.DeleteModelRequest(name="llama3-8b-instruct", version="v2"), metadata=ADMIN)
    assert (await stub.GetModel(S.GetModelRequest(name="llama3-8b-instruct"))).model.version == "v1"


async def test_traffic_watch_follows_the_splits_through_a_restart(make_registry: Any, tmp_path: Any) -> None:
    from tests.registry.procs import free_port

    port = free_port()
    db = f"sqlite:///{tmp_path}/traffic.db"
    running, stub = await make_registry(database_url=db, listen=f"127.0.0.1:{port}")
    await stub.CreateModel(
        S.CreateModelRequest(model=S.Model(name="tiny-llama", version="v2")), metadata=ADMIN
    )
    changes: list[dict[str, dict[str, int]]] = []
    watch = TrafficWatch(f"127.0.0.1:{port}", on_change=changes.append, max_backoff_s=0.2)
    watch.start()
    try:
        await asyncio.wait_for(watch.synced.wait(), 2)
        assert watch.weights("tiny-llama") == {}
        await stub.SetTrafficWeights(
            S.SetTrafficWeightsRequest(name="tiny", weights={"v1": 90, "v2": 10}), metadata=ADMIN
        )

        async def split_is(expected: dict[str, int]) -> None:
            while watch.weights("tiny-llama") != expected:  # noqa: ASYNC110 (the watch fills it)
                await asyncio.sleep(0.02)

        await asyncio.wait_for(split_is({"v1": 90, "v2": 10}), 2)
        await running.stop(None)
        assert watch.weights("tiny-llama") == {"v1": 90, "v2": 10}  # kept while the registry is away
        _, stub = await make_registry(database_url=db, listen=f"127.0.0.1:{port}")
        await asyncio.wait_for(_snapshots(watch, 2), 5)
        await stub.SetTrafficWeights(
            S.SetTrafficWeightsRequest(name="tiny", weights={"v2": 1}), metadata=ADMIN
        )
        await asyncio.wait_for(split_is({"v2": 1}), 2)
        assert changes[-1] == {"tiny-llama": {"v2": 1}}
    finally:
        await watch.stop()


async def _snapshots(watch: TrafficWatch, n: int) -> None:
    while watch.snapshots < n:  # noqa: ASYNC110 (the watch counts them)
        await asyncio.sleep(0.02)
