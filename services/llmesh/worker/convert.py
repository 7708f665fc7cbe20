"""Conversions between the worker's protobuf messages and the engine's value objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from llmesh.common.errors import InvalidRequest
from llmesh.common.v1 import common_pb2
from llmesh.worker.engine import (
    ChatMessage,
    ChoiceDelta,
    EngineLoad,
    GenerationChunk,
    GenerationInput,
    GenerationRequest,
    Sampling,
    StructuredSpec,
    TokenLogprob,
    ToolCall,
    ToolChoice,
)
from llmesh.worker.v1 import worker_service_pb2 as pb

FINISH_TO_PROTO = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
}


def _opt(msg: object, name: str) -> object | None:
    return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[attr-defined]


def structured_from_proto(so: common_pb2.StructuredOutput) -> StructuredSpec | None:
    kind = so.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "choice":
        return StructuredSpec(kind="choice", choices=tuple(so.choice.values))
    if kind == "json_object":
        return StructuredSpec(kind="json_object") if so.json_object else None
    return StructuredSpec(kind=kind, value=getattr(so, kind))


def sampling_from_proto(sp: common_pb2.SamplingParams) -> Sampling:
    """Proto sampling → engine sampling; unset optionals stay None (engine defaults)."""
    n = _opt(sp, "n")
    skip = _opt(sp, "skip_special_tokens")
    return Sampling(
        temperature=_opt(sp, "temperature"),  # type: ignore[arg-type]
        top_p=_opt(sp, "top_p"),  # type: ignore[arg-type]
        top_k=_opt(sp, "top_k"),  # type: ignore[arg-type]
        min_p=_opt(sp, "min_p"),  # type: ignore[arg-type]
        presence_penalty=_opt(sp, "presence_penalty"),  # type: ignore[arg-type]
        frequency_penalty=_opt(sp, "frequency_penalty"),  # type: ignore[arg-type]
        repetition_penalty=_opt(sp, "repetition_penalty"),  # type: ignore[arg-type]
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        seed=_opt(sp, "seed"),  # type: ignore[arg-type]
        max_tokens=_opt(sp, "max_tokens"),  # type: ignore[arg-type]
        min_tokens=_opt(sp, "min_tokens"),  # type: ignore[arg-type]
        logprobs=sp.logprobs,
        top_logprobs=_opt(sp, "top_logprobs"),  # type: ignore[arg-type]
        n=int(n) if n is not None else 1,  # type: ignore[call-overload]
        ignore_eos=sp.ignore_eos,
        include_stop_str_in_output=sp.include_stop_str_in_output,
        skip_special_tokens=bool(skip) if skip is not None else True,
        structured=structured_from_proto(sp.structured_output),
        logit_bias=tuple(sorted(sp.logit_bias.items())),
    )


def chat_from_proto(chat: pb.ChatInput) -> GenerationInput:
    return GenerationInput.messages(
        [ChatMessage(role=m.role, content=m.content, name=m.name) for m in chat.messages],
        add_generation_prompt=chat.add_generation_prompt,
        chat_template=chat.chat_template or None,
    )


def input_from_proto(req: pb.GenerateRequest | pb.TokenizeRequest) -> GenerationInput:
    kind = req.WhichOneof("input")
    if kind == "prompt":
        return GenerationInput.text(req.prompt)  # type: ignore[union-attr]
    if kind == "text":
        return GenerationInput.text(req.text)  # type: ignore[union-attr]
    if kind == "prompt_token_ids":
        return GenerationInput.tokens(req.prompt_token_ids.ids)  # type: ignore[union-attr]
    if kind == "chat":
        return chat_from_proto(req.chat)
    raise InvalidRequest("no input: set prompt, prompt_token_ids or chat")


def request_from_proto(req: pb.GenerateRequest, request_id: str) -> GenerationRequest:
    """A validated engine request; raises InvalidRequest with what to fix."""
    return GenerationRequest(
        request_id=req.request_id or request_id,
        model=req.model,
        input=input_from_proto(req),
        sampling=sampling_from_proto(req.sampling),
        priority=req.priority,
    )


def with_tools(
    request: GenerationRequest,
    tools: Sequence[Mapping[str, Any]],
    choice: ToolChoice | None,
    turns: Sequence[tuple[tuple[ToolCall, ...], str]],
) -> GenerationRequest:
    """A chat request with the tools its template renders, each turn's tool calls or answered call
    id, and how calls are looked for (the worker proto's chat turns carry text only)."""
    chat = request.input.chat
    if chat is None:
        raise InvalidRequest("tools need a chat; send messages")
    messages = tuple(
        replace(m, tool_calls=calls, tool_call_id=call_id)
        for m, (calls, call_id) in zip(chat, turns, strict=True)
    )
    return replace(
        request, input=replace(request.input, chat=messages, tools=tuple(tools)), tool_choice=choice
    )


def _logprob_to_proto(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token=lp.token,
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_logprobs=[_logprob_to_proto(t) for t in lp.top],
    )


def _delta_to_proto(d: ChoiceDelta) -> pb.ChoiceDelta:
    return pb.ChoiceDelta(
        index=d.index,
        text=d.text,
        token_ids=d.token_ids,
        logprobs=[_logprob_to_proto(lp) for lp in d.logprobs],
        finish_reason=FINISH_TO_PROTO.get(d.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
        stop_reason=d.stop_reason or "",
    )


def chunk_to_proto(
    request_id: str, chunk: GenerationChunk, first: bool, finished: set[int]
) -> pb.GenerateResponse:
    """One engine chunk → one stream message; usage only on the last.

    `finished` holds the choices already reported finished; their repeats are dropped.
    """
    deltas = []
    for d in chunk.choices:
        if d.index in finished:
            continue
        if d.finish_reason:
            finished.add(d.index)
        deltas.append(_delta_to_proto(d))
    msg = pb.GenerateResponse(request_id=request_id, choices=deltas)
    if first:
        msg.prompt_tokens = chunk.prompt_tokens
    if chunk.finished:
        msg.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.completion_tokens,
                total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
            )
        )
    return msg


def load_to_proto(load: EngineLoad) -> common_pb2.WorkerLoad:
    return common_pb2.WorkerLoad(
        running_requests=load.running,
        waiting_requests=load.waiting,
        kv_cache_usage=load.kv_cache_usage,
        output_tokens_per_second=load.output_tokens_per_second,
        prefix_cache_hit_rate=load.prefix_cache_hit_rate,
    )
