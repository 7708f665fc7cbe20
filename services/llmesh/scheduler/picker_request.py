"""What the endpoint picker reads from a request Envoy holds: which RPC, which model, how big.

Envoy hands the picker the request body as gRPC sends it (after the JSON transcoder for REST
clients): one length-prefixed frame holding the RPC's request message. Only what scheduling needs
is taken from it; the worker validates the request in full.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from llmesh.common.errors import InvalidRequest
from llmesh.model.openai_requests import PRIORITIES
from llmesh.model.v1 import model_service_pb2 as pb

_SERVICE = "/" + pb.DESCRIPTOR.services_by_name["ModelService"].full_name + "/"

# The RPCs the picker routes to workers, by gRPC path, with their request message type.
INFERENCE_METHODS: dict[str, type[Message]] = {
    _SERVICE + "CreateChatCompletion": pb.CreateChatCompletionRequest,
    _SERVICE + "StreamChatCompletion": pb.CreateChatCompletionRequest,
    _SERVICE + "CreateCompletion": pb.CreateCompletionRequest,
    _SERVICE + "StreamCompletion": pb.CreateCompletionRequest,
    _SERVICE + "CreateEmbeddings": pb.CreateEmbeddingsRequest,
    _SERVICE + "Tokenize": pb.TokenizeRequest,
    _SERVICE + "Detokenize": pb.DetokenizeRequest,
}
# Why a call without its request message is refused (headers that end the stream, or an empty body).
NO_BODY = "the request has no body; send the RPC's message"
# A completion without max_tokens may generate this many (OpenAI's completions default).
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class PickerRequest:
    """The scheduling facts of one request. `max_tokens` 0 means "the model's output limit"."""

    path: str
    model: str
    prompt_tokens: int
    max_tokens: int
    priority: int


def _unframe(body: bytes, encoding: str) -> bytes:
    """The message inside a gRPC frame (1-byte compressed flag, 4-byte big-endian length)."""
    if not body:
        raise InvalidRequest(NO_BODY)
    if len(body) < 5:
        raise InvalidRequest("the request body is not a gRPC message frame")
    compressed, length = struct.unpack(">BI", body[:5])
    payload = body[5 : 5 + length]
    if len(payload) != length:
        raise InvalidRequest("the request body holds a truncated gRPC message")
    if not compressed:
        return payload
    if encoding == "gzip":
        return gzip.decompress(payload)
    if encoding == "deflate":
        return zlib.decompress(payload)
    raise InvalidRequest(f"grpc-encoding {encoding!r} is not supported; send identity or gzip")


def _estimate_chat(request: pb.CreateChatCompletionRequest) -> int:
    # About 4 characters per token plus a few template tokens per turn: the lease only needs a
    # rough size (the worker counts exactly).
    chars = sum(len(m.content.string_value) or m.content.ByteSize() for m in request.messages)
    return chars // 4 + 8 * len(request.messages)


def _estimate_completion(request: pb.CreateCompletionRequest) -> int:
    kind = request.prompt.WhichOneof("kind")
    if kind == "string_value":
        return len(request.prompt.string_value) // 4 + 1
    if kind == "list_value":
        return len(request.prompt.list_value.values) or request.prompt.ByteSize() // 4
    return 0


def _estimate_embeddings(request: pb.CreateEmbeddingsRequest) -> int:
    # Token ids count one each; text about 4 characters per token.
    kind = request.input.WhichOneof("kind")
    if kind == "string_value":
        return len(request.input.string_value) // 4 + 1
    if kind == "list_value":
        total = 0
        for item in request.input.list_value.values:
            if item.WhichOneof("kind") == "list_value":
                total += len(item.list_value.values)
            elif item.WhichOneof("kind") == "string_value":
                total += len(item.string_value) // 4 + 1
            else:
                total += 1
        return total
    return 0


def read_request(path: str, body: bytes, encoding: str = "") -> PickerRequest:
    """Parse an inference RPC's request; InvalidRequest says what is wrong with it."""
    message_type = INFERENCE_METHODS.get(path)
    if message_type is None:
        raise InvalidRequest(f"{path} is not an inference RPC the picker routes")
    message = message_type()
    try:
        message.ParseFromString(_unframe(body, encoding))
    except (DecodeError, OSError, zlib.error) as error:
        raise InvalidRequest(f"the request body does not parse as {message_type.__name__}: {error}") from None
    model = getattr(message, "model", "")
    priority_name = getattr(message, "priority", "")
    priority = PRIORITIES.get(priority_name, PRIORITIES[""])
    if isinstance(message, pb.CreateChatCompletionRequest):
        if message.HasField("max_completion_tokens"):
            max_tokens = message.max_completion_tokens
        else:
            max_tokens = message.max_tokens if message.HasField("max_tokens") else 0
        return PickerRequest(path, model, _estimate_chat(message), max_tokens, priority)
    if isinstance(message, pb.CreateCompletionRequest):
        max_tokens = message.max_tokens if message.HasField("max_tokens") else COMPLETION_DEFAULT_MAX_TOKENS
        return PickerRequest(path, model, _estimate_completion(message), max_tokens, priority)
    if isinstance(message, pb.CreateEmbeddingsRequest):
        # Embeddings generate nothing: one token of output keeps the lease from defaulting to the
        # model's output limit.
        return PickerRequest(path, model, _estimate_embeddings(message), 1, priority)
    return PickerRequest(path, model, 0, 0, priority)
