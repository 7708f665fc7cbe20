"""What an inference request asks for, read from the gRPC frame ext_authz forwards.

Envoy's ext_authz runs after the JSON transcoder with the body packed as bytes, so REST and
native gRPC requests alike arrive as one gRPC frame: a compressed flag, a 4-byte big-endian
length, then the protobuf message.

The reservation needs a worst case, not a guess: a byte-level tokenizer never makes more tokens
than bytes, so the serialized request's size (plus a chat-template allowance per message) bounds
the prompt, and the output is bounded by max_tokens times the number of choices.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from llmesh.auth import routes
from llmesh.common.errors import InvalidRequest
from llmesh.model.v1 import model_service_pb2 as model_pb2

# Template tokens a chat template may add around each message, and once per conversation.
PER_MESSAGE_TOKENS = 8
PER_REQUEST_TOKENS = 32
# OpenAI's (and the gateway's) default for text completions.
COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 128


@dataclass(frozen=True)
class Demand:
    """The model a request names and the tokens it may use at most."""

    model: str
    prompt_tokens: int
    max_output_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_output_tokens


def unframe(body: bytes, encoding: str = "") -> bytes:
    """The message inside one gRPC frame (decompressed when the flag says so)."""
    if len(body) < 5:
        raise InvalidRequest("the request body is not a gRPC message (shorter than its 5-byte frame header)")
    compressed, length = body[0], int.from_bytes(body[1:5], "big")
    payload = body[5:]
    if len(payload) < length:
        raise InvalidRequest(
            f"the request body was cut at {len(payload)} of {length} bytes before the auth check; "
            "send a smaller request"
        )
    payload = payload[:length]
    if compressed:
        try:
            if encoding == "gzip":
                payload = gzip.decompress(payload)
            elif encoding == "deflate":
                payload = zlib.decompress(payload)
            else:
                raise InvalidRequest(f"grpc-encoding {encoding!r} is not supported at the edge; use gzip")
        except (OSError, zlib.error, EOFError):
            raise InvalidRequest("the compressed request body does not decompress") from None
    return payload


def _parse(message: Message, payload: bytes) -> None:
    try:
        message.ParseFromString(payload)
    except DecodeError:
        raise InvalidRequest(f"the request body is not a valid {message.DESCRIPTOR.name}") from None


def demand_of(method: str, body: bytes, *, default_max_tokens: int, encoding: str = "") -> Demand:
    """Model and worst-case tokens of an inference or model-scoped request."""
    payload = unframe(body, encoding)
    size = len(payload)
    if method in routes.INFERENCE_CHAT:
        chat = model_pb2.CreateChatCompletionRequest()
        _parse(chat, payload)
        if chat.HasField("max_completion_tokens"):
            out = chat.max_completion_tokens
        elif chat.HasField("max_tokens"):
            out = chat.max_tokens
        else:
            out = default_max_tokens
        n = chat.n if chat.HasField("n") and chat.n > 0 else 1
        prompt = size + PER_MESSAGE_TOKENS * len(chat.messages) + PER_REQUEST_TOKENS
        return Demand(chat.model, prompt, out * min(n, MAX_CHOICES))
    if method in routes.INFERENCE_TEXT:
        text = model_pb2.CreateCompletionRequest()
        _parse(text, payload)
        out = text.max_tokens if text.HasField("max_tokens") else COMPLETION_DEFAULT_MAX_TOKENS
        n = text.n if text.HasField("n") and text.n > 0 else 1
        return Demand(text.model, size + PER_REQUEST_TOKENS, out * min(n, MAX_CHOICES))
    if method in routes.INFERENCE_GENERATE:
        gen = model_pb2.GenerateRequest()
        _parse(gen, payload)
        params = gen.parameters
        out = params.max_new_tokens if params.HasField("max_new_tokens") else default_max_tokens
        return Demand(gen.model, size + PER_REQUEST_TOKENS, out)
    if method in routes.INFERENCE_EMBED:
        embed = model_pb2.CreateEmbeddingsRequest()
        _parse(embed, payload)
        # A token id takes at least one byte on the wire and a text token at least one byte too,
        # so the payload's size bounds the inputs' tokens (plus the special tokens of each input).
        inputs = embed.input.list_value.values if embed.input.WhichOneof("kind") == "list_value" else ()
        return Demand(embed.model, size + PER_MESSAGE_TOKENS * max(1, len(inputs)), 0)
    if method == routes.MODEL + "Tokenize":
        tok = model_pb2.TokenizeRequest()
        _parse(tok, payload)
        return Demand(tok.model, 0, 0)
    if method == routes.MODEL + "Detokenize":
        detok = model_pb2.DetokenizeRequest()
        _parse(detok, payload)
        return Demand(detok.model, 0, 0)
    raise InvalidRequest(f"{method} does not name a model")
