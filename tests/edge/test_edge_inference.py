"""The edge on the real token path: Envoy → endpoint picker (the scheduler, ext_proc) → worker.

`stack_factory(..., edge=True)` (tests/scripted_stack.py) runs the real registry, scheduler, auth
and workers in-process, with the ScriptedEngine test double, behind a real Envoy rendered by
llmesh.edge. These tests pin what the edge contributes to inference: every inference binding
reaches a worker through the picker, `"stream": true` selects the streaming RPC, SSE framing,
native gRPC streaming (grpcurl), request ids and the access log.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from llmesh.edge.descriptor import http_routes
from llmesh.edge.workers import WORKERS_CLUSTER, inference_paths
from llmesh.model.v1 import model_service_pb2_grpc as model_grpc
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from tests.edge.edge_http import run
from tests.scripted_stack import MODEL, ScriptedStack, access_log_lines, chat, engine, settled

pytestmark = pytest.mark.envoy

SERVICE = "/llmesh.model.v1.ModelService/"
MESSAGES = '"messages":[{"role":"user","content":"hi"}]'


def http(stack: ScriptedStack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.envoy.url, timeout=30)


def log_path(stack: ScriptedStack) -> Path:
    return Path(stack.envoy.settings.access_log_path)


async def post(
    stack: ScriptedStack, path: str, body: bytes | dict[str, Any], request_id: str
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http(stack) as client:
        return await client.post(
            path, content=content, headers={"x-request-id": request_id, "content-type": "application/json"}
        )


INFERENCE_BODIES: dict[str, dict[str, Any]] = {
    "CreateChatCompletion": {"model": "sm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "StreamChatCompletion": {"model": "sm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "CreateCompletion": {"model": "sm", "prompt": "hi", "max_tokens": 2},
    "StreamCompletion": {"model": "sm", "prompt": "hi", "max_tokens": 2},
    "Tokenize": {"model": "sm", "prompt": "tok1 tok2"},
    "Detokenize": {"model": "sm", "tokens": [1, 2]},
    "CreateEmbeddings": {"model": "sm", "input": "hi"},
}
# The scripted model generates and does not embed: its worker says so (which proves the request
# reached it through the picker like the others).
REFUSED_BY_THE_WORKER = {"CreateEmbeddings": (400, "does not serve embeddings")}


async def test_every_inference_rest_binding_reaches_a_worker_through_the_picker(
    stack_factory, descriptor_path: Path
) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    routes = [r for r in http_routes(descriptor_path) if r.grpc_path in inference_paths()]
    assert {r.grpc_path for r in routes} == set(inference_paths())
    sent = {}
    for route in routes:
        request_id = f"inference-{uuid.uuid4().hex}"
        response = await post(stack, route.path, INFERENCE_BODIES[route.method], request_id)
        status, words = REFUSED_BY_THE_WORKER.get(route.method, (200, ""))
        assert response.status_code == status and words in response.text, (route, response.text)
        assert response.headers["x-request-id"] == request_id
        sent[request_id] = route
    lines = await access_log_lines(log_path(stack), *sent)
    for request_id, route in sent.items():
        line = lines[request_id]
        assert line["rpc"] == route.grpc_path, line
        assert line["upstream_cluster"] == WORKERS_CLUSTER, line
        assert line["upstream_host"] == stack.worker_addresses["w0"], line
        assert int(line["picker_us"]) > 0, line  # the wait for the picker's answer, as Envoy timed it
    status = await stack.scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
    assert status.leases_granted == len(routes)  # each one was leased by the picker
    await settled(stack)


STREAM_CASES = [
    (
        "/v1/chat/completions",
        b'{"model":"sm",' + MESSAGES.encode() + b',"stream":true}',
        "StreamChatCompletion",
    ),
    (
        "/v1/chat/completions",
        b'{ "model" : "sm" ,\n "stream"\t:  true , ' + MESSAGES.encode() + b"}",
        "StreamChatCompletion",
    ),
    (
        "/v1/chat/completions",
        b'{"model":"sm",' + MESSAGES.encode() + b',"stream":false}',
        "CreateChatCompletion",
    ),
    ("/v1/chat/completions", b'{"model":"sm",' + MESSAGES.encode() + b"}", "CreateChatCompletion"),
    # "stream" inside content or nested values is not the top-level flag.
    (
        "/v1/chat/completions",
        b'{"model":"sm","messages":[{"role":"user","content":"\\"stream\\": true"}]}',
        "CreateChatCompletion",
    ),
    (
        "/v1/chat/completions",
        b'{"model":"sm","guided_json":{"stream":true},' + MESSAGES.encode() + b"}",
        "CreateChatCompletion",
    ),
    (
        "/v1/chat/completions",
        b'{"model":"sm","user":"stream","stop":"\\"stream\\":true",' + MESSAGES.encode() + b"}",
        "CreateChatCompletion",
    ),
    ("/v1/completions", b'{"model":"sm","prompt":"hi","stream":true}', "StreamCompletion"),
    ("/v1/completions", b'{"model":"sm","prompt":"hi"}', "CreateCompletion"),
    (
        "/v1/chat/completions?trace=1",
        b'{"model":"sm",' + MESSAGES.encode() + b',"stream":true}',
        "StreamChatCompletion",
    ),
    ("/v1/chat/completions:stream", b'{"model":"sm",' + MESSAGES.encode() + b"}", "StreamChatCompletion"),
]


async def test_top_level_stream_true_selects_the_streaming_rpc(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    sent = {}
    for path, body, rpc in STREAM_CASES:
        request_id = f"stream-{uuid.uuid4().hex}"
        body = body[:-1] + b',"max_tokens":2}'
        response = await post(stack, path, body, request_id)
        assert response.status_code == 200, (path, body, response.text)
        streaming = rpc.startswith("Stream")
        content_type = "text/event-stream" if streaming else "application/json"
        assert response.headers["content-type"] == content_type, (path, body)
        if streaming:
            assert response.text.endswith("data: [DONE]\n\n"), (path, body)
        sent[request_id] = (path, body, rpc)
    lines = await access_log_lines(log_path(stack), *sent)
    for request_id, (path, body, rpc) in sent.items():
        line = lines[request_id]
        assert line["rpc"] == SERVICE + rpc, (path, body, line)
        assert line["path"] == path, line  # what the client sent, before stream routing
        assert line["method"] == "POST" and line["status"] == 200
        assert line["upstream_cluster"] == WORKERS_CLUSTER
    await settled(stack)


async def test_streams_are_server_sent_events(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    body = {"model": "sm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with http(stack) as client:
        unary = (await client.post("/v1/chat/completions", json=body)).json()
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=stream_body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            raw = b"".join([part async for part in response.aiter_bytes()]).decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    chunks = []
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event, event
        chunks.append(json.loads(event.removeprefix("data: ")))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == unary["choices"][0]["message"]["content"]  # the same deterministic tokens
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "role" not in chunks[1]["choices"][0]["delta"]  # unset optional fields are omitted
    assert all("tool_calls" not in c["choices"][0]["delta"] for c in chunks if c["choices"])
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert isinstance(chunks[0]["created"], int)
    assert len({c["id"] for c in chunks}) == 1
    await settled(stack)


async def test_grpcurl_streams_a_chat_through_envoy(stack_factory, grpcurl_bin: str) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    target = f"127.0.0.1:{stack.envoy.port}"
    rc, out, err = await run(grpcurl_bin, "-plaintext", target, "list")
    assert rc == 0, err
    assert "llmesh.model.v1.ModelService" in out.split()  # reflection, served by the registry
    rc, out, err = await run(
        grpcurl_bin,
        "-plaintext",
        "-d",
        json.dumps({"model": MODEL.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        target,
        "llmesh.model.v1.ModelService/StreamChatCompletion",
    )
    assert rc == 0, err
    # One chunk per token; no SSE sentinel for native gRPC clients.
    assert out.count('"object": "chat.completion.chunk"') == 3
    assert "[DONE]" not in out
    await settled(stack)


async def test_request_id_is_returned_and_logged_but_not_the_platform_id(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    sent = str(uuid.uuid4())
    body = {"model": "sm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = await post(stack, "/v1/chat/completions", body, sent)
    assert response.status_code == 200
    # A client's UUID-shaped id comes back unchanged (Envoy would pack trace bits into it)...
    assert response.headers["x-request-id"] == sent
    line = (await access_log_lines(log_path(stack), sent))[sent]
    assert line["rpc"] == SERVICE + "CreateChatCompletion" and line["status"] == 200
    assert line["upstream_host"] == stack.worker_addresses["w0"]
    # ...and is kept for logs only: the platform mints the completion's id.
    assert sent not in response.json()["id"]
    # Without one, Envoy generates an id.
    async with http(stack) as client:
        generated = (await client.post("/v1/chat/completions", json=body)).headers["x-request-id"]
    assert generated and generated != sent
    await settled(stack)


MALFORMED = [
    b"{bad json",
    b'{"model": "sm"',
    b"[1, 2]",
    b'"text"',
    b'{"messages": 5}',
    b'{"model": "sm", "stream": true, "messages": 5}',
    b'{"model": "sm", "temperature": "hot"}',
]


async def test_malformed_json_is_a_400_before_the_picker(stack_factory) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True)
    async with http(stack) as client:
        for body in MALFORMED:
            response = await client.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "code", "param"}
            assert error["type"] == "invalid_request_error" and error["code"] == "INVALID_ARGUMENT"
            assert error["message"].startswith("invalid request: "), (body, error)
    status = await stack.scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
    assert status.leases_granted == 0  # the transcoder refused them all: no worker was leased


async def test_a_grpc_call_without_a_message_is_invalid_argument_and_reaches_no_worker(stack_factory) -> None:
    # The picker reads the model from the request body; a call that ends with its headers is
    # refused by the picker instead of reaching a worker unpicked.
    stack = await stack_factory({"w0": engine()}, edge=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.envoy.port}") as channel:
        for path in inference_paths():
            call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call(iter(())):
                    pass
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
            assert "has no body" in (refused.value.details() or ""), path
        # The same path with a message still works.
        stub = model_grpc.ModelServiceStub(channel)
        reply = await stub.CreateChatCompletion(chat(max_tokens=2))
        assert reply.usage.completion_tokens == 2
    status = await stack.scheduler.GetSchedulerStatus(sched_pb.GetSchedulerStatusRequest())
    assert status.leases_granted == 1
    await settled(stack)


async def test_a_request_body_of_many_chunks_reaches_the_worker_whole(stack_factory) -> None:
    # Envoy streams a large body to the picker in several chunks; the picker hands it back whole
    # with its answer (CONTINUE_AND_REPLACE), and the worker must see every byte of it: it counts
    # the prompt's tokens (one per word for the scripted double) in its refusal.
    stack = await stack_factory({"w0": engine()}, edge=True)
    words = 60_000  # ~400 KB of prompt, far past one HTTP/2 frame
    prompt = " ".join(f"w{i}" for i in range(words))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.envoy.port}") as channel:
        stub = model_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateChatCompletion(chat(prompt, max_tokens=2))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    counted = re.search(r"the prompt has (\d+) tokens", refused.value.details() or "")
    assert counted is not None, refused.value.details()
    assert words <= int(counted.group(1)) <= words + 8  # every word, plus the chat template's own
    await settled(stack)
