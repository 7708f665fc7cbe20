"""Models YAML import/export (byte-stable round trips) and the start-up models file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from llmesh.common.config import ConfigError
from llmesh.registry.server import RegistryServiceConfig, start_registry
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc

ADMIN = (("x-llmesh-role", "admin"), ("x-llmesh-user", "ops"))
S = registry_pb2

# Both forms a models YAML may take: the nested export form and the config file's flat form.
MODELS_YAML = """
models:
- name: llama3-8b-instruct
  version: v1
  aliases: [llama3]
  status: ready
  traffic_weight: 90
  engine: {engine: vllm, source: meta-llama/Meta-Llama-3-8B-Instruct, dtype: bfloat16, max_model_len: 8192,
           tensor_parallel_size: 2, gpu_memory_utilization: 0.85}
  limits: {max_output_tokens: 2048, max_prompt_tokens: 6144}
  default_sampling: {temperature: 0.7, top_p: 0.9, repetition_penalty: 1.1}
  templates:
  - {name: qa, system_prompt: Answer briefly., user_template: "Q: {input}"}
  - {name: summarize, system_prompt: Summarize., user_template: "{input}"}
  cost_per_1k_tokens: 0.25
  labels: {family: llama, gpu: a100}
- name: llama3-8b-instruct
  version: v2
  traffic_weight: 10
  engine: {source: meta-llama/Meta-Llama-3.1-8B-Instruct, max_model_len: 8192}
- name: qwen2-0.5b-instruct
  path: Qwen/Qwen2-0.5B-Instruct
  dtype: float16
  max_output_tokens: 512
  aliases: [qwen2]
  description: "Qwen2 0.5B: small and quick"
"""


async def export(stub: Any) -> str:
    return (await stub.ExportModels(S.ExportModelsRequest(), metadata=ADMIN)).yaml


async def test_import_export_import_is_idempotent_and_byte_stable(
    db_url: str, make_registry: Any, sqlite_url: str, tmp_path: Path
) -> None:
    _, stub = await make_registry(database_url=db_url, models=())
    first = await stub.ImportModels(S.ImportModelsRequest(yaml=MODELS_YAML), metadata=ADMIN)
    assert list(first.imported) == ["llama3-8b-instruct", "qwen2-0.5b-instruct"]
    assert list(first.created) == ["llama3-8b-instruct@v1", "llama3-8b-instruct@v2", "qwen2-0.5b-instruct@v1"]
    exported = await export(stub)
    data = yaml.safe_load(exported)["models"]
    assert [(m["name"], m["version"], m["traffic_weight"]) for m in data] == [
        ("llama3-8b-instruct", "v1", 90),
        ("llama3-8b-instruct", "v2", 10),
        ("qwen2-0.5b-instruct", "v1", 0),
    ]
    assert data[0]["default_sampling"] == {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
    assert data[0]["engine"]["tensor_parallel_size"] == 2 and data[0]["status"] == "ready"
    assert (
        data[2]["engine"]["source"] == "Qwen/Qwen2-0.5B-Instruct"
        and data[2]["limits"]["max_output_tokens"] == 512
    )
    etags = {(m.name, m.version): m.etag for m in (await stub.ListModels(S.ListModelsRequest())).models}
    audit = len((await stub.ListAuditEvents(S.ListAuditEventsRequest(limit=1000), metadata=ADMIN)).events)

    # Importing the export again changes nothing: no row written, no etag moved, no audit entry.
    again = await stub.ImportModels(S.ImportModelsRequest(yaml=exported), metadata=ADMIN)
    assert list(again.created) == [] and list(again.updated) == [] and len(again.unchanged) == 3
    assert {
        (m.name, m.version): m.etag for m in (await stub.ListModels(S.ListModelsRequest())).models
    } == etags
    assert (
        len((await stub.ListAuditEvents(S.ListAuditEventsRequest(limit=1000), metadata=ADMIN)).events)
        == audit
    )
    assert await export(stub) == exported

    # Restoring the export into an empty catalog gives back the same bytes.
    _, other = await make_registry(database_url=f"sqlite:///{tmp_path}/restore.db", models=())
    await other.ImportModels(S.ImportModelsRequest(yaml=exported), metadata=ADMIN)
    assert await export(other) == exported

    # A changed row is updated (and only that one); `replace` retires versions the file leaves out.
    changed = exported.replace("cost_per_1k_tokens: 0.25", "cost_per_1k_tokens: 0.3")
    result = await stub.ImportModels(S.ImportModelsRequest(yaml=changed), metadata=ADMIN)
    assert list(result.updated) == ["llama3-8b-instruct@v1"] and len(result.unchanged) == 2
    only_v2 = yaml.safe_dump(
        {"models": [m for m in yaml.safe_load(changed)["models"] if m["version"] == "v2"]}
    )
    await stub.ImportModels(S.ImportModelsRequest(yaml=only_v2), metadata=ADMIN)  # v1 ready: left alone
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ImportModels(S.ImportModelsRequest(yaml=only_v2, replace=True), metadata=ADMIN)
    assert (
        err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "llama3-8b-instruct@v1" in err.value.details()
    )


async def test_models_file_is_upserted_at_start_up(tmp_path: Path, sqlite_url: str) -> None:
    models_file = tmp_path / "models.yaml"
    models_file.write_text(MODELS_YAML)
    config = RegistryServiceConfig(listen="127.0.0.1:0", database_url=sqlite_url, models_file=models_file)
    for _ in range(2):  # the second start finds everything as the file says and writes nothing
        running = await start_registry(config)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stub = registry_grpc.RegistryServiceStub(channel)
        models = (await stub.ListModels(S.ListModelsRequest())).models
        assert sorted((m.name, m.version) for m in models) == [
            ("llama3-8b-instruct", "v1"),
            ("llama3-8b-instruct", "v2"),
            ("qwen2-0.5b-instruct", "v1"),
        ]
        audit = (await stub.ListAuditEvents(S.ListAuditEventsRequest(), metadata=ADMIN)).events
        assert {e.actor for e in audit} == {"models-file"} and len(audit) == 3
        await channel.close(None)
        await running.stop(None)

    models_file.write_text("models:\n- name: broken\n  engine: {max_model_len: -1}\n")
    with pytest.raises(
        ConfigError, match=rf"models file {models_file}: models\[0\]\.engine\.max_model_len is -1"
    ):
        await start_registry(config)
