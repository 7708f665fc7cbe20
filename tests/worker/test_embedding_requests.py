"""The embeddings request and response mapping (OpenAI JSON <-> the contract), without an engine.

The engine itself, the worker and the edge are tested on the real MiniLM model in
tests/e2e/test_embeddings.py."""

from __future__ import annotations

import base64
import struct

import pytest
from google.protobuf import json_format

from llmesh.common.errors import InvalidRequest
from llmesh.model import openai_responses as out
from llmesh.model.openai_requests import MAX_EMBEDDING_INPUTS, prepare_embeddings
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.scheduler.picker_request import read_request
from llmesh.worker.embedding import check_dimensions


def request(**body: object) -> pb.CreateEmbeddingsRequest:
    """The request as Envoy's transcoder builds it from OpenAI's JSON."""
    return json_format.ParseDict({"model": "m", **body}, pb.CreateEmbeddingsRequest())


@pytest.mark.parametrize(
    ("given", "inputs"),
    [
        ("one text", ("one text",)),
        (["a", "b"], ("a", "b")),
        ([1, 2, 3], ((1, 2, 3),)),
        ([[1, 2], [3]], ((1, 2), (3,))),
        (["a", [4, 5]], ("a", (4, 5))),
    ],
)
def test_every_openai_input_shape(given: object, inputs: tuple[object, ...]) -> None:
    prepared = prepare_embeddings(request(input=given))
    assert prepared.inputs == inputs
    assert prepared.encoding_format == "float" and prepared.dimensions is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "input is required"),
        ({"input": ""}, "input is an empty string"),
        ({"input": []}, "input is an empty list"),
        ({"input": [[]]}, "input[0] is an empty list of token ids"),
        ({"input": [1.5]}, "non-negative integer token ids"),
        ({"input": [{"a": 1}]}, "input[0] must be a string or a list of token ids"),
        ({"input": 3}, "input must be a string"),
        ({"input": ["x"] * (MAX_EMBEDDING_INPUTS + 1)}, f"at most {MAX_EMBEDDING_INPUTS}"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format must be 'float' or 'base64'"),
        ({"input": "x", "dimensions": 0}, "dimensions must be at least 1"),
    ],
)
def test_bad_requests_say_what_to_fix(body: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        prepare_embeddings(request(**body))
    assert words in info.value.message


def test_base64_is_little_endian_float32_of_the_float_vector() -> None:
    vector = [0.5, -1.25, 3.0]
    floats = json_format.MessageToDict(out.embeddings_response("m", [vector], 7, "float"))
    packed = json_format.MessageToDict(out.embeddings_response("m", [vector], 7, "base64"))
    assert floats["data"][0]["embedding"] == vector
    assert struct.unpack("<3f", base64.b64decode(packed["data"][0]["embedding"])) == tuple(vector)
    assert floats["usage"] == {"promptTokens": 7, "totalTokens": 7}  # no completion_tokens
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"


def test_dimensions_only_where_the_model_was_trained_for_them() -> None:
    assert check_dimensions("m", None, 384, matryoshka=False) is None
    assert check_dimensions("m", 384, 384, matryoshka=False) is None
    assert check_dimensions("m", 128, 768, matryoshka=True) == 128
    with pytest.raises(InvalidRequest, match="omit dimensions or set it to 384"):
        check_dimensions("m", 128, 384, matryoshka=False)
    with pytest.raises(InvalidRequest, match="more than"):
        check_dimensions("m", 1024, 768, matryoshka=True)


def test_the_picker_routes_embeddings_by_model_with_no_output_demand() -> None:
    message = request(input=["four words in here", [1, 2, 3]]).SerializeToString()
    frame = b"\x00" + len(message).to_bytes(4, "big") + message
    facts = read_request("/llmesh.model.v1.ModelService/CreateEmbeddings", frame)
    assert facts.model == "m" and facts.max_tokens == 1 and facts.prompt_tokens == 4 + 1 + 3
