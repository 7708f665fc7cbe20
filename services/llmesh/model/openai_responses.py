"""Engine deltas → OpenAI-shaped chat/text completion responses and stream chunks.

Built straight from the engine's value objects (no intermediate worker message), because this
runs once per streamed chunk on the token path.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from google.protobuf import struct_pb2

from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.worker.engine import ChoiceDelta, GenerationChunk, TokenLogprob, ToolCallDelta

ChunkT = TypeVar("ChunkT", pb.StreamChatCompletionResponse, pb.StreamCompletionResponse, covariant=True)

# The `object` of the last message of a REST stream: the edge's Lua filter turns the frame that
# carries it into OpenAI's `data: [DONE]` (see envoy/llmesh/edge/lua/edge.lua).
DONE_SENTINEL = "[DONE]"


class Chunker(Protocol[ChunkT]):
    """Builds the stream messages of one OpenAI-shaped streaming response."""

    def chunk(self, deltas: Sequence[ChoiceDelta]) -> ChunkT: ...

    def usage_chunk(self, usage: pb.Usage) -> ChunkT: ...

    def error_chunk(self, error: pb.StreamError) -> ChunkT: ...

    def done_chunk(self) -> ChunkT: ...


def fresh_deltas(chunk: GenerationChunk, finished: set[int]) -> list[ChoiceDelta]:
    """The chunk's deltas minus repeats of choices already reported finished (n > 1).

    `finished` accumulates the indexes whose end has been passed on.
    """
    out = []
    for delta in chunk.choices:
        if delta.index in finished:
            continue
        if delta.finish_reason:
            finished.add(delta.index)
        out.append(delta)
    return out


def usage_of(prompt_tokens: int, completion_tokens: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _chat_token(lp: TokenLogprob) -> pb.ChatTokenLogprob:
    return pb.ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()))


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> pb.ChatLogprobs:
    out = pb.ChatLogprobs()
    for lp in logprobs:
        token = _chat_token(lp)
        token.top_logprobs.extend(_chat_token(t) for t in lp.top)
        out.content.append(token)
    return out


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int) -> pb.CompletionLogprobs:
    out = pb.CompletionLogprobs()
    for lp in logprobs:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        top = struct_pb2.Struct()
        for t in lp.top:
            top.fields[t.token].number_value = t.logprob
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""
    stop_reason: str = ""
    tool_calls: dict[int, pb.ToolCall] = field(default_factory=dict)

    def add_calls(self, fragments: Sequence[ToolCallDelta]) -> None:
        """Fragments joined into whole calls, as an OpenAI client joins a stream's."""
        for f in fragments:
            call = self.tool_calls.get(f.index)
            if call is None:
                call = self.tool_calls[f.index] = pb.ToolCall(type="function")
                call.function.SetInParent()
            if f.id:
                call.id = f.id
            call.function.name += f.name
            call.function.arguments += f.arguments


def tool_call_chunks(fragments: Sequence[ToolCallDelta]) -> list[pb.ToolCall]:
    """Stream fragments as OpenAI sends them: id, type and name on a call's first fragment only."""
    out = []
    for f in fragments:
        call = pb.ToolCall(index=f.index)
        if f.id:
            call.id, call.type = f.id, "function"
        if f.name:
            call.function.name = f.name
        if f.arguments or f.name:
            call.function.arguments = f.arguments
        out.append(call)
    return out


class ResponseAccumulator:
    """Collects a whole generation into the choices of a unary response."""

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}

    def add(self, deltas: Sequence[ChoiceDelta]) -> None:
        for delta in deltas:
            choice = self._choices.setdefault(delta.index, _Choice())
            choice.text.append(delta.text)
            if delta.tool_calls:
                choice.add_calls(delta.tool_calls)
            choice.logprobs.extend(delta.logprobs)
            if delta.finish_reason:
                choice.finish_reason = delta.finish_reason
                choice.stop_reason = delta.stop_reason or ""

    def chat_choices(self) -> list[pb.ChatCompletionChoice]:
        out = []
        for index in sorted(self._choices):
            c = self._choices[index]
            text = "".join(c.text)
            message = pb.ChatCompletionMessage(role="assistant")
            if text or not c.tool_calls:  # OpenAI: no content when the model only called tools
                message.content = text
            message.tool_calls.extend(c.tool_calls[i] for i in sorted(c.tool_calls))
            choice = pb.ChatCompletionChoice(
                index=index, message=message, finish_reason=c.finish_reason or "stop"
            )
            if c.logprobs:
                choice.logprobs.CopyFrom(chat_logprobs(c.logprobs))
            if c.stop_reason:
                choice.stop_reason = c.stop_reason
            out.append(choice)
        return out

    def completion_choices(self, echo_text: str) -> list[pb.CompletionChoice]:
        out = []
        for index in sorted(self._choices):
            c = self._choices[index]
            choice = pb.CompletionChoice(
                index=index, text=echo_text + "".join(c.text), finish_reason=c.finish_reason or "stop"
            )
            if c.logprobs:
                choice.logprobs.CopyFrom(completion_logprobs(c.logprobs, len(echo_text)))
            if c.stop_reason:
                choice.stop_reason = c.stop_reason
            out.append(choice)
        return out


class ChatChunker:
    """Turns each engine chunk into one chat.completion.chunk, immediately (nothing held back)."""

    def __init__(self, response_id: str, model: str) -> None:
        self.response_id, self.model, self.created = response_id, model, int(time.time())
        self._started: set[int] = set()

    def _base(self) -> pb.StreamChatCompletionResponse:
        return pb.StreamChatCompletionResponse(
            id=self.response_id, object="chat.completion.chunk", created=self.created, model=self.model
        )

    def chunk(self, deltas: Sequence[ChoiceDelta]) -> pb.StreamChatCompletionResponse:
        out = self._base()
        for delta in deltas:
            choice = out.choices.add(index=delta.index)
            choice.delta.SetInParent()  # OpenAI always sends "delta", even an empty one
            if delta.index not in self._started:
                self._started.add(delta.index)
                choice.delta.role = "assistant"
            if delta.text or not (delta.finish_reason or delta.tool_calls):
                choice.delta.content = delta.text
            if delta.tool_calls:
                choice.delta.tool_calls.extend(tool_call_chunks(delta.tool_calls))
            if delta.logprobs:
                choice.logprobs.CopyFrom(chat_logprobs(delta.logprobs))
            if delta.finish_reason:
                choice.finish_reason = delta.finish_reason
                if delta.stop_reason:
                    choice.stop_reason = delta.stop_reason
        return out

    def usage_chunk(self, usage: pb.Usage) -> pb.StreamChatCompletionResponse:
        out = self._base()
        out.usage.CopyFrom(usage)
        return out

    def error_chunk(self, error: pb.StreamError) -> pb.StreamChatCompletionResponse:
        out = self._base()
        out.error.CopyFrom(error)
        return out

    def done_chunk(self) -> pb.StreamChatCompletionResponse:
        return pb.StreamChatCompletionResponse(object=DONE_SENTINEL)


class CompletionChunker:
    """Turns each engine chunk into one text_completion chunk."""

    def __init__(self, response_id: str, model: str, echo_text: str) -> None:
        self.response_id, self.model, self.created = response_id, model, int(time.time())
        self._echo = echo_text
        self._offsets: dict[int, int] = {}

    def _base(self) -> pb.StreamCompletionResponse:
        return pb.StreamCompletionResponse(
            id=self.response_id, object="text_completion", created=self.created, model=self.model
        )

    def chunk(self, deltas: Sequence[ChoiceDelta]) -> pb.StreamCompletionResponse:
        out = self._base()
        for delta in deltas:
            prefix = ""
            if delta.index not in self._offsets:
                prefix = self._echo
                self._offsets[delta.index] = 0
            choice = out.choices.add(index=delta.index, text=prefix + delta.text)
            if delta.logprobs:
                choice.logprobs.CopyFrom(
                    completion_logprobs(delta.logprobs, self._offsets[delta.index] + len(prefix))
                )
            self._offsets[delta.index] += len(prefix) + len(delta.text)
            if delta.finish_reason:
                choice.finish_reason = delta.finish_reason
                if delta.stop_reason:
                    choice.stop_reason = delta.stop_reason
        return out

    def usage_chunk(self, usage: pb.Usage) -> pb.StreamCompletionResponse:
        out = self._base()
        out.usage.CopyFrom(usage)
        return out

    def error_chunk(self, error: pb.StreamError) -> pb.StreamCompletionResponse:
        out = self._base()
        out.error.CopyFrom(error)
        return out

    def done_chunk(self) -> pb.StreamCompletionResponse:
        return pb.StreamCompletionResponse(object=DONE_SENTINEL)


def embedding_value(vector: Sequence[float], encoding_format: str) -> struct_pb2.Value:
    """One vector as OpenAI sends it: a list of numbers, or base64 of little-endian float32s."""
    if encoding_format == "base64":
        packed = struct.pack(f"<{len(vector)}f", *vector)
        return struct_pb2.Value(string_value=base64.b64encode(packed).decode("ascii"))
    values = struct_pb2.ListValue()
    values.extend(vector)
    return struct_pb2.Value(list_value=values)


def embeddings_response(
    model: str, vectors: Sequence[Sequence[float]], prompt_tokens: int, encoding_format: str
) -> pb.CreateEmbeddingsResponse:
    """OpenAI's `list` of `embedding` objects, with usage (prompt tokens only)."""
    return pb.CreateEmbeddingsResponse(
        object="list",
        data=[
            pb.Embedding(object="embedding", index=i, embedding=embedding_value(v, encoding_format))
            for i, v in enumerate(vectors)
        ],
        model=model,
        usage=pb.Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    )
