"""End to end on the real stack: gateway → scheduler lease → worker → vLLM (CPU) on the tiny model.

The stack runs as child processes (`llmesh serve ...`) on ephemeral ports, shared by the session.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import grpc
import pytest
from google.protobuf import struct_pb2

from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from llmesh.worker.v1 import worker_service_pb2 as worker_pb
from llmesh.worker.v1 import worker_service_pb2_grpc as worker_grpc
from tests.support import VllmStack, grpcurl_path

pytestmark = pytest.mark.vllm


def chat(
    stack: VllmStack, content: str = "Tell me a story", **fields: object
) -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(
        model=stack.model,
        messages=[pb.ChatMessage(role="user", content=struct_pb2.Value(string_value=content))],
        **fields,  # type: ignore[arg-type]
    )


async def test_streaming_chat_from_vllm_through_the_gateway(vllm_stack: VllmStack) -> None:
    async with grpc.aio.insecure_channel(vllm_stack.gateway) as channel:
        gateway = pb_grpc.ModelServiceStub(channel)
        request = chat(
            vllm_stack, max_tokens=24, ignore_eos=True, stream_options=pb.StreamOptions(include_usage=True)
        )
        chunks = [c async for c in gateway.StreamChatCompletion(request)]
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
    async with grpc.aio.insecure_channel(vllm_stack.gateway) as channel:
        gateway = pb_grpc.ModelServiceStub(channel)
        reply = await gateway.CreateChatCompletion(chat(vllm_stack, max_tokens=8, ignore_eos=True, seed=7))
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 8
        text = await gateway.CreateCompletion(
            pb.CreateCompletionRequest(
                model="tiny", prompt=struct_pb2.Value(string_value="The cat"), max_tokens=6, ignore_eos=True
            )
        )
        assert text.model == vllm_stack.model and text.usage.completion_tokens == 6


async def test_client_cancel_aborts_the_engine_request_and_releases_the_lease(vllm_stack: VllmStack) -> None:
    async with (
        grpc.aio.insecure_channel(vllm_stack.gateway) as gw_channel,
        grpc.aio.insecure_channel(vllm_stack.worker) as worker_channel,
        grpc.aio.insecure_channel(vllm_stack.scheduler) as sched_channel,
    ):
        gateway = pb_grpc.ModelServiceStub(gw_channel)
        worker = worker_grpc.WorkerServiceStub(worker_channel)
        scheduler = sched_grpc.SchedulerServiceStub(sched_channel)
        # 1000 tokens take seconds on CPU; the engine must go idle long before that.
        call = gateway.StreamChatCompletion(chat(vllm_stack, max_tokens=1000, ignore_eos=True))
        received = 0
        async for _ in call:
            received += 1
            if received == 2:
                break
        load = await worker.GetLoad(worker_pb.GetLoadRequest())
        assert load.load.running_requests + load.load.waiting_requests == 1
        cancelled_at = time.monotonic()
        call.cancel()
        idle_after = None
        while time.monotonic() - cancelled_at < 5:
            load = await worker.GetLoad(worker_pb.GetLoadRequest())
            status = await scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
            if load.load.running_requests + load.load.waiting_requests == 0 and all(
                w.active_leases == 0 for w in status.workers
            ):
                idle_after = time.monotonic() - cancelled_at
                break
            await asyncio.sleep(0.02)
        assert idle_after is not None, "engine request still running / lease still held 5 s after cancel"
        # Usage of the aborted request is still counted by the worker's rate window.
        assert idle_after < 1.0


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
        ({"max_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "at most 1024"),
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
    async with grpc.aio.insecure_channel(vllm_stack.gateway) as channel:
        gateway = pb_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.CreateChatCompletion(request)
    assert info.value.code() == code, info.value.details()
    assert words in (info.value.details() or "")


SERVICES = {
    "gateway": "llmesh.model.v1.ModelService",
    "registry": "llmesh.registry.v1.RegistryService",
    "scheduler": "llmesh.scheduler.v1.SchedulerService",
    "worker": "llmesh.worker.v1.WorkerService",
}


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([grpcurl_path(), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("server", sorted(SERVICES))
def test_grpcurl_lists_services_by_reflection_and_checks_health(vllm_stack: VllmStack, server: str) -> None:
    address = getattr(vllm_stack, server)
    listing = grpcurl("-plaintext", address, "list")
    assert listing.returncode == 0, listing.stderr
    names = set(listing.stdout.split())
    assert {SERVICES[server], "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    for service in ("", SERVICES[server]):
        health = grpcurl(
            "-plaintext", "-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check"
        )
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout)["status"] == "SERVING"


def test_grpcurl_describes_and_streams_a_chat(vllm_stack: VllmStack) -> None:
    described = grpcurl("-plaintext", vllm_stack.gateway, "describe", "llmesh.model.v1.ModelService")
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
        vllm_stack.gateway,
        "llmesh.model.v1.ModelService/StreamChatCompletion",
    )
    assert result.returncode == 0, result.stderr
    chunks = [
        json.loads(part) for part in result.stdout.replace("}\n{", "}\x00{").split("\x00") if part.strip()
    ]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    last = chunks[-1]["choices"][0]
    assert last.get("finish_reason", last.get("finishReason")) == "length"


def test_auth_service_answers_unimplemented_honestly(vllm_stack: VllmStack) -> None:
    address = vllm_stack.stack.child("auth")  # type: ignore[attr-defined]
    result = grpcurl(
        "-plaintext", "-d", "{}", f"127.0.0.1:{address.port}", "llmesh.auth.v1.AuthService/GetMe"
    )
    assert result.returncode != 0
    assert "Unimplemented" in result.stderr and "not implemented yet" in result.stderr


async def test_tokenize_round_trip_with_the_real_tokenizer(vllm_stack: VllmStack) -> None:
    async with grpc.aio.insecure_channel(vllm_stack.gateway) as channel:
        gateway = pb_grpc.ModelServiceStub(channel)
        tokens = await gateway.Tokenize(
            pb.TokenizeRequest(model=vllm_stack.model, prompt="the cat sat", add_special_tokens=False)
        )
        assert tokens.count == len(tokens.tokens) > 0 and tokens.max_model_len == 2048
        text = await gateway.Detokenize(pb.DetokenizeRequest(model=vllm_stack.model, tokens=tokens.tokens))
    assert text.prompt.strip() == "the cat sat"
