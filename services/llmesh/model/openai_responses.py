"""Worker stream messages → OpenAI-shaped chat/text completion responses and chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from google.protobuf import struct_pb2

from llmesh.common.v1 import common_pb2
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.worker.v1 import worker_service_pb2 as worker_pb

FINISH_NAMES = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    common_pb2.FINISH_REASON_ERROR: "error",
}


ChunkT = TypeVar("ChunkT", pb.StreamChatCompletionResponse, pb.StreamCompletionResponse, covariant=True)


class Chunker(Protocol[ChunkT]):
    """Builds the stream messages of one OpenAI-shaped streaming response."""

    def chunk(self, message: worker_pb.GenerateResponse) -> ChunkT: ...

    def usage_chunk(self, usage: pb.Usage) -> ChunkT: ...

    def error_chunk(self, error: pb.StreamError) -> ChunkT: ...


def finish_name(reason: int) -> str | None:
    return FINISH_NAMES.get(reason)  # type: ignore[call-overload]


def usage_of(stats_prompt: int, stats_completion: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=stats_prompt,
        completion_tokens=stats_completion,
        total_tokens=stats_prompt + stats_completion,
    )


def chat_logprobs(delta: worker_pb.ChoiceDelta) -> pb.ChatLogprobs:
    return pb.ChatLogprobs(
        content=[
            pb.ChatTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[
                    pb.ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
                    for t in lp.top_logprobs
                ],
            )
            for lp in delta.logprobs
        ]
    )


def completion_logprobs(delta: worker_pb.ChoiceDelta, offset: int) -> pb.CompletionLogprobs:
    out = pb.CompletionLogprobs()
    for lp in delta.logprobs:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        top = struct_pb2.Struct()
        for t in lp.top_logprobs:
            top.fields[t.token].number_value = t.logprob
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""
    stop_reason: str = ""


class ResponseAccumulator:
    """Collects a whole worker stream into the choices of a unary response."""

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}

    def add(self, message: worker_pb.GenerateResponse) -> None:
        for delta in message.choices:
            choice = self._choices.setdefault(delta.index, _Choice())
            choice.text.append(delta.text)
            choice.logprobs.extend(delta.logprobs)
            if delta.finish_reason:
                choice.finish_reason = finish_name(delta.finish_reason) or ""
                choice.stop_reason = delta.stop_reason

    def chat_choices(self) -> list[pb.ChatCompletionChoice]:
        out = []
        for index in sorted(self._choices):
            c = self._choices[index]
            choice = pb.ChatCompletionChoice(
                index=index,
                message=pb.ChatCompletionMessage(role="assistant", content="".join(c.text)),
                finish_reason=c.finish_reason or "stop",
            )
            if c.logprobs:
                choice.logprobs.CopyFrom(chat_logprobs(worker_pb.ChoiceDelta(logprobs=c.logprobs)))
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
                choice.logprobs.CopyFrom(
                    completion_logprobs(worker_pb.ChoiceDelta(logprobs=c.logprobs), len(echo_text))
                )
            if c.stop_reason:
                choice.stop_reason = c.stop_reason
            out.append(choice)
        return out


class ChatChunker:
    """Turns each worker message into one chat.completion.chunk, immediately (nothing held back)."""

    def __init__(self, response_id: str, model: str) -> None:
        self.response_id, self.model, self.created = response_id, model, int(time.time())
        self._started: set[int] = set()

    def chunk(self, message: worker_pb.GenerateResponse) -> pb.StreamChatCompletionResponse:
        out = pb.StreamChatCompletionResponse(
            id=self.response_id, object="chat.completion.chunk", created=self.created, model=self.model
        )
        for delta in message.choices:
            choice = out.choices.add(index=delta.index)
            choice.delta.SetInParent()  # OpenAI always sends "delta", even an empty one
            if delta.index not in self._started:
                self._started.add(delta.index)
                choice.delta.role = "assistant"
            if delta.text or not delta.finish_reason:
                choice.delta.content = delta.text
            if delta.logprobs:
                choice.logprobs.CopyFrom(chat_logprobs(delta))
            reason = finish_name(delta.finish_reason)
            if reason:
                choice.finish_reason = reason
                if delta.stop_reason:
                    choice.stop_reason = delta.stop_reason
        return out

    def usage_chunk(self, usage: pb.Usage) -> pb.StreamChatCompletionResponse:
        return pb.StreamChatCompletionResponse(
            id=self.response_id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            usage=usage,
        )

    def error_chunk(self, error: pb.StreamError) -> pb.StreamChatCompletionResponse:
        return pb.StreamChatCompletionResponse(
            id=self.response_id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            error=error,
        )


class CompletionChunker:
    """Turns each worker message into one text_completion chunk."""

    def __init__(self, response_id: str, model: str, echo_text: str) -> None:
        self.response_id, self.model, self.created = response_id, model, int(time.time())
        self._echo = echo_text
        self._offsets: dict[int, int] = {}

    def _base(self) -> pb.StreamCompletionResponse:
        return pb.StreamCompletionResponse(
            id=self.response_id, object="text_completion", created=self.created, model=self.model
        )

    def chunk(self, message: worker_pb.GenerateResponse) -> pb.StreamCompletionResponse:
        out = self._base()
        for delta in message.choices:
            prefix = ""
            if delta.index not in self._offsets:
                prefix = self._echo
                self._offsets[delta.index] = 0
            choice = out.choices.add(index=delta.index, text=prefix + delta.text)
            if delta.logprobs:
                choice.logprobs.CopyFrom(completion_logprobs(delta, self._offsets[delta.index] + len(prefix)))
            self._offsets[delta.index] += len(prefix) + len(delta.text)
            reason = finish_name(delta.finish_reason)
            if reason:
                choice.finish_reason = reason
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
