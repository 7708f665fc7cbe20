"""A worker's inference metrics, for an engine other than vLLM (the ScriptedEngine double behind a
real worker server): vLLM's names move by exactly what the stream reported, cancelled and failed
streams end with their finish reason, and the engine gauges read the engine at scrape time."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from grpc import aio

from llmesh.common.config import ModelConfig
from llmesh.common.metrics import REGISTRY, start_metrics_endpoint
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.worker.embedding import EmbeddingInput, Embeddings
from llmesh.worker.scripted_engine import ScriptedEngine, ScriptedSettings
from llmesh.worker.server import WorkerServiceConfig, start_worker

MODEL = ModelConfig(name="metrics-model", engine="scripted", max_model_len=2048, max_output_tokens=512)


@pytest.fixture
def worker_id() -> str:
    return f"metrics-{uuid.uuid4().hex[:8]}"  # a label of its own: absolute values per test


@contextlib.asynccontextmanager
async def served(worker_id: str, **settings: object) -> AsyncIterator[pb_grpc.ModelServiceStub]:
    """A real worker server on the ScriptedEngine, and a stub dialing it."""
    engine = ScriptedEngine(ScriptedSettings(model=MODEL.name, **settings))  # type: ignore[arg-type]
    running = await start_worker(
        WorkerServiceConfig(listen="127.0.0.1:0", model=MODEL, worker_id=worker_id), engine=engine
    )
    channel = aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield pb_grpc.ModelServiceStub(channel)
    finally:
        await channel.close(None)
        await running.stop(0)


def value(name: str, worker_id: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"model_name": MODEL.name, "worker": worker_id, **labels}) or 0.0


def genai(name: str, worker_id: str, **labels: str) -> float:
    base = {"gen_ai_operation_name": "chat", "gen_ai_request_model": MODEL.name, "worker": worker_id}
    return REGISTRY.get_sample_value(name, {**base, **labels}) or 0.0


def chat(max_tokens: int) -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(
        model=MODEL.name,
        messages=[pb.ChatMessage(role="user", content=struct_pb2.Value(string_value="count for me"))],
        max_tokens=max_tokens,
        ignore_eos=True,
        stream_options=pb.StreamOptions(include_usage=True),
    )


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_finished_stream_moves_every_counter_by_its_usage(worker_id: str) -> None:
    async with served(worker_id, tokens_per_second=200) as stub:
        chunks = [c async for c in stub.StreamChatCompletion(chat(7))]
        usage = chunks[-1].usage
        content = [c for c in chunks if c.choices]
        assert usage.completion_tokens == 7 and usage.prompt_tokens > 0
        assert value("vllm:generation_tokens_total", worker_id) == 7
        assert value("vllm:prompt_tokens_total", worker_id) == usage.prompt_tokens
        assert value("vllm:request_success_total", worker_id, finished_reason="length") == 1
        assert value("vllm:time_to_first_token_seconds_count", worker_id) == 1
        assert value("vllm:e2e_request_latency_seconds_count", worker_id) == 1
        # One gap per engine chunk after the first; the double sends one token per chunk.
        assert value("vllm:inter_token_latency_seconds_count", worker_id) == len(content) - 1 == 6
        assert genai("gen_ai_client_token_usage_sum", worker_id, gen_ai_token_type="output") == 7
        assert (
            genai("gen_ai_client_token_usage_sum", worker_id, gen_ai_token_type="input")
            == usage.prompt_tokens
        )
        assert genai("gen_ai_server_time_per_output_token_seconds_count", worker_id) == 1
        per_token = genai("gen_ai_server_time_per_output_token_seconds_sum", worker_id)
        assert 0.001 < per_token < 1.0  # 200 tokens/s: about 5 ms each
        assert value("vllm:num_requests_running", worker_id) == 0
        # Only vLLM reports queue time: no series for this engine.
        assert value("vllm:request_queue_time_seconds_count", worker_id) == 0


async def test_a_cancelled_stream_counts_as_abort_with_the_tokens_it_produced(worker_id: str) -> None:
    async with served(worker_id, tokens_per_second=50) as stub:
        call = stub.StreamChatCompletion(chat(400))
        await call.read()
        await call.read()
        assert value("vllm:num_requests_running", worker_id) == 1  # the engine's gauge, read now
        # A scrape over HTTP reads it from the server's thread, via the event loop.
        endpoint = start_metrics_endpoint("127.0.0.1:0")
        try:
            async with httpx.AsyncClient() as http:
                scraped = (await http.get(endpoint.url)).text
        finally:
            endpoint.close()
        labels = f'model_name="{MODEL.name}",worker="{worker_id}"'
        assert f"vllm:num_requests_running{{{labels}}} 1.0" in scraped
        assert f"vllm:kv_cache_usage_perc{{{labels}}} 0.0" in scraped
        call.cancel()
        await until(lambda: value("vllm:request_success_total", worker_id, finished_reason="abort") == 1)
        produced = value("vllm:generation_tokens_total", worker_id)
        assert 2 <= produced < 400
        assert value("vllm:request_success_total", worker_id, finished_reason="length") == 0


async def test_a_failing_engine_counts_as_error(worker_id: str) -> None:
    async with served(worker_id, fail_after=3) as stub:
        with pytest.raises(aio.AioRpcError) as failed:
            async for _ in stub.StreamChatCompletion(chat(10)):
                pass
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        await until(lambda: value("vllm:request_success_total", worker_id, finished_reason="error") == 1)
        assert value("vllm:generation_tokens_total", worker_id) == 3


class EmbeddingDouble(ScriptedEngine):
    """The ScriptedEngine that also embeds: one token per character, 4-dimensional vectors."""

    def dimensions(self) -> int:
        return 4

    async def embed(
        self, model: str, inputs: Sequence[EmbeddingInput], dimensions: int | None = None
    ) -> Embeddings:
        tokens = sum(len(i) for i in inputs)
        return Embeddings(tuple((1.0, 0.0, 0.0, 0.0) for _ in inputs), tokens)


async def test_an_embeddings_request_counts_its_prompt_tokens(worker_id: str) -> None:
    running = await start_worker(
        WorkerServiceConfig(listen="127.0.0.1:0", model=MODEL, worker_id=worker_id),
        engine=EmbeddingDouble(ScriptedSettings(model=MODEL.name)),
    )
    channel = aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        reply = await pb_grpc.ModelServiceStub(channel).CreateEmbeddings(
            pb.CreateEmbeddingsRequest(model=MODEL.name, input=struct_pb2.Value(string_value="twelve chars"))
        )
        assert reply.usage.prompt_tokens == 12
        assert value("vllm:prompt_tokens_total", worker_id) == 12
        assert value("vllm:request_success_total", worker_id, finished_reason="stop") == 1
        assert value("vllm:generation_tokens_total", worker_id) == 0
    finally:
        await channel.close(None)
        await running.stop(0)
