"""Traces start at Envoy: one request through a real Envoy (auth on) is one trace, with Envoy's
spans (exported over OTLP/gRPC to a real collector server) and the server spans of AuthService's
Check, the picker's ext_proc stream (scheduler) and the worker's ModelService call. The services
run in-process (their spans go to an in-memory exporter); workers run the scripted test double,
since this is about trace propagation, not inference."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmesh.bench.otlp_collector import OtlpCollector, start_collector
from llmesh.cli.stack import Stack
from llmesh.common import tracing
from llmesh.registry.v1 import registry_service_pb2 as reg_pb
from llmesh.registry.v1 import registry_service_pb2_grpc as reg_grpc
from tests.scripted_stack import chat, engine

EXPORTER = InMemorySpanExporter()
WORKER_SPAN = "/llmesh.model.v1.ModelService/StreamChatCompletion"
PICKER_SPAN = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
AUTH_SPAN = "/envoy.service.auth.v3.Authorization/Check"


@pytest.fixture(scope="module", autouse=True)
def traced() -> Iterator[None]:
    assert tracing.setup_tracing("llmesh-test", exporter=EXPORTER)
    yield
    tracing.disable_tracing()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[OtlpCollector, str]]:
    received, server, address = await start_collector()
    yield received, address
    await server.stop(None)


async def test_one_request_is_one_trace_from_envoy_through_auth_the_picker_and_the_worker(
    stack_factory, collector: tuple[OtlpCollector, str]
) -> None:
    received, address = collector
    stack = await stack_factory({"w0": engine()}, edge=True, auth=True, otlp_endpoint=address)
    assert stack.models is not None
    request_id = f"trace-{uuid.uuid4().hex}"
    metadata = (("authorization", f"Bearer {stack.admin_key}"), ("x-request-id", request_id))
    chunks = [c async for c in stack.models.StreamChatCompletion(chat(max_tokens=4), metadata=metadata)]
    assert chunks and chunks[0].choices

    # Server spans end when their handlers return, just after the client has its last message.
    deadline = time.monotonic() + 10
    while True:
        finished = EXPORTER.get_finished_spans()
        workers = [s for s in finished if s.name == WORKER_SPAN]
        trace_id = format(workers[-1].context.trace_id, "032x") if workers else ""
        in_trace = {s.name for s in finished if format(s.context.trace_id, "032x") == trace_id}
        if {WORKER_SPAN, PICKER_SPAN, AUTH_SPAN} <= in_trace:
            break
        assert time.monotonic() < deadline, (
            f"trace {trace_id!r}: {in_trace}; all: {sorted({s.name for s in finished})}"
        )
        await asyncio.sleep(0.1)

    # Envoy batches its spans (about every 5 s): wait for the request's.
    deadline = time.monotonic() + 20
    while not any(t == trace_id and service == "llmesh-edge" for t, service, _ in received.spans):
        assert time.monotonic() < deadline, (
            f"Envoy exported no span of trace {trace_id}: {received.spans[-5:]}"
        )
        await asyncio.sleep(0.2)
    edge_spans = [name for t, service, name in received.spans if t == trace_id and service == "llmesh-edge"]
    assert len(edge_spans) >= 2, edge_spans  # the request's span and its upstream (router) span


async def test_a_service_process_exports_its_spans_over_otlp(
    tmp_path: Path, collector: tuple[OtlpCollector, str]
) -> None:
    """`monitoring.otlp_endpoint` in a real `llmesh serve` process: its server spans reach the
    collector (the OTLP exporter imports and sends; an old copy of the OpenTelemetry protos from
    xds-protos once broke exactly that)."""
    received, address = collector
    config = tmp_path / "llmesh.yaml"
    config.write_text(yaml.safe_dump({"monitoring": {"otlp_endpoint": f"http://{address}"}}))
    stack = Stack(tmp_path, config)
    try:
        registry = await asyncio.to_thread(stack.start, "registry", listen="127.0.0.1:0")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
            await reg_grpc.RegistryServiceStub(channel).ListWorkers(reg_pb.ListWorkersRequest())
        # The SDK's batch processor exports about every 5 s.
        deadline = time.monotonic() + 20
        while not any(
            service == "llmesh-registry" and name.endswith("/ListWorkers")
            for _, service, name in received.spans
        ):
            assert time.monotonic() < deadline, (
                f"no ListWorkers span from the registry: {received.spans[-5:]}"
            )
            await asyncio.sleep(0.2)
    finally:
        await asyncio.to_thread(stack.stop_all)
