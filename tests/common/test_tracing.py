"""Traces across real in-process servers: a caller's span context flows through llmesh's client
channels into every service's server spans (one trace id), the worker's span carries the GenAI
attributes, and log lines inside a span carry its ids."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmesh.common import tracing
from llmesh.common.channels import service_channel
from llmesh.common.logs import JsonFormatter
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from tests.scripted_stack import MODEL, chat, engine

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def traced() -> Iterator[None]:
    assert tracing.setup_tracing("llmesh-test", exporter=EXPORTER)
    yield
    # Servers and channels made by later tests get no tracing interceptors.
    tracing.disable_tracing()


def spans_of(trace_id: int) -> dict[str, list]:  # type: ignore[type-arg]
    found: dict[str, list] = {}  # type: ignore[type-arg]
    for span in EXPORTER.get_finished_spans():
        if span.context.trace_id == trace_id:
            found.setdefault(span.name, []).append(span)
    return found


async def test_a_chat_streamed_from_a_worker_joins_the_callers_trace_with_genai_attributes(
    stack_factory,
) -> None:
    stack = await stack_factory({"w0": engine()})
    channel = service_channel(stack.worker_addresses["w0"])
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        request = chat(max_tokens=6, ignore_eos=True, stream_options=pb.StreamOptions(include_usage=True))
        chunks = [c async for c in pb_grpc.ModelServiceStub(channel).StreamChatCompletion(request)]
    await channel.close(None)
    usage = chunks[-1].usage
    spans = spans_of(caller.get_span_context().trace_id)
    by_kind = {s.kind: s for s in spans["/llmesh.model.v1.ModelService/StreamChatCompletion"]}
    server, client = by_kind[trace.SpanKind.SERVER], by_kind[trace.SpanKind.CLIENT]
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert client.parent is not None and client.parent.span_id == caller.get_span_context().span_id
    assert server.resource.attributes["service.name"] == "llmesh-test"
    attributes = dict(server.attributes or {})
    assert attributes["gen_ai.request.model"] == MODEL.name
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens == 6
    assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("length",)  # type: ignore[arg-type]


async def test_an_acquire_traces_the_scheduler_and_the_registry_call_it_makes(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()})
    channel = service_channel(stack.addresses["scheduler"])
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        acquired = await sched_grpc.SchedulerServiceStub(channel).Acquire(
            sched_pb.AcquireRequest(request_id=uuid.uuid4().hex, model=MODEL.name, max_tokens=4)
        )
    await sched_grpc.SchedulerServiceStub(channel).Release(
        sched_pb.ReleaseRequest(lease_id=acquired.lease.lease_id)
    )
    await channel.close(None)
    spans = spans_of(caller.get_span_context().trace_id)
    (acquire,) = [
        s for s in spans["/llmesh.scheduler.v1.SchedulerService/Acquire"] if s.kind == trace.SpanKind.SERVER
    ]
    assert acquire.parent is not None
    # The scheduler looked the model up in the registry's catalog, inside the same trace.
    registry_calls = [
        s for name, found in spans.items() if name.startswith("/llmesh.registry.v1.") for s in found
    ]
    servers = [s for s in registry_calls if s.kind == trace.SpanKind.SERVER]
    clients = [s for s in registry_calls if s.kind == trace.SpanKind.CLIENT]
    assert servers and clients, sorted(spans)
    assert servers[0].parent.span_id == clients[0].context.span_id  # type: ignore[union-attr]
    assert clients[0].parent.span_id == acquire.context.span_id  # type: ignore[union-attr]


def test_log_lines_inside_a_span_carry_its_trace_and_span_ids() -> None:
    record_filter, formatter = tracing.TraceIdsFilter(), JsonFormatter("test")
    with trace.get_tracer("test").start_as_current_span("work") as span:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "inside", (), None)
        assert record_filter.filter(record)
        line = json.loads(formatter.format(record))
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["span_id"] == format(span.get_span_context().span_id, "016x")
    outside = logging.LogRecord("x", logging.INFO, __file__, 1, "outside", (), None)
    record_filter.filter(outside)
    assert "trace_id" not in json.loads(formatter.format(outside))
