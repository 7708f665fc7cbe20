"""Tool calls out of a choice's generated text, chunk by chunk.

Three readers, one per way a chat with tools is answered (engine.ToolChoice):
- "named": the output is constrained to the arguments of one function, so every piece of text is
  an arguments fragment of call 0;
- "required": the output is constrained to a JSON list of `{"name", "parameters"}` calls; it is
  read whole when the choice ends (a partial list names no call yet);
- "auto": the model writes its own format and vLLM's tool parser for the model finds the calls,
  streaming (`extract_tool_calls_streaming`) or, for a unary answer, on the whole text
  (`extract_tool_calls`).

vLLM is imported only by VllmToolParsers (the "auto" readers), which only the vLLM adapter builds.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from llmesh.common.errors import InvalidRequest
from llmesh.worker.engine import ChatMessage, GenerationChunk, ToolCallDelta, ToolChoice


def new_call_id() -> str:
    """A call id in OpenAI's shape ("call_" and 24 characters)."""
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolReader(Protocol):
    """Reads one choice's output; `feed` returns the text that is content and the call fragments."""

    called: bool

    def feed(
        self, text: str, token_ids: Sequence[int], finished: bool
    ) -> tuple[str, tuple[ToolCallDelta, ...]]: ...


class NamedCallReader:
    """The whole output is the arguments of `function` (tool_choice naming it)."""

    def __init__(self, function: str) -> None:
        self._function = function
        self.called = False

    def feed(
        self, text: str, token_ids: Sequence[int], finished: bool
    ) -> tuple[str, tuple[ToolCallDelta, ...]]:
        if not self.called:
            self.called = True
            return "", (ToolCallDelta(0, id=new_call_id(), name=self._function, arguments=text),)
        return "", (ToolCallDelta(0, arguments=text),) if text else ()


class RequiredCallsReader:
    """The output is a JSON list of calls (tool_choice "required"), read when the choice ends."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self.called = False

    def feed(
        self, text: str, token_ids: Sequence[int], finished: bool
    ) -> tuple[str, tuple[ToolCallDelta, ...]]:
        self._text.append(text)
        if not finished:
            return "", ()
        whole = "".join(self._text)
        calls = _calls_of(whole)
        if calls is None:  # cut short (max_tokens): not a list of calls, so the client gets the text
            return whole, ()
        self.called = bool(calls)
        return "", tuple(
            ToolCallDelta(i, id=new_call_id(), name=name, arguments=arguments)
            for i, (name, arguments) in enumerate(calls)
        )


def _calls_of(text: str) -> list[tuple[str, str]] | None:
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list):
        return None
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        out.append((call["name"], json.dumps(call.get("parameters", {}), ensure_ascii=False)))
    return out


def required_calls_schema(tools: Sequence[Mapping[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a "required" answer: a list of at least one call of the given tools."""
    variants = []
    for tool in tools:
        function = tool["function"]
        variants.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [function["name"]]},
                    "parameters": function.get("parameters") or {"type": "object", "properties": {}},
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class ParserReader:
    """tool_choice "auto": vLLM's tool parser for the model, one instance per choice (it keeps state)."""

    def __init__(self, parser: Any, request: Any, streaming: bool) -> None:
        self._parser, self._request, self._streaming = parser, request, streaming
        self._text = ""
        self._token_ids: list[int] = []
        self._sent: dict[int, str] = {}  # arguments streamed per call index
        self.called = False

    def feed(
        self, text: str, token_ids: Sequence[int], finished: bool
    ) -> tuple[str, tuple[ToolCallDelta, ...]]:
        previous_text, previous_ids = self._text, list(self._token_ids)
        self._text += text
        self._token_ids.extend(token_ids)
        if not self._streaming:
            return self._whole() if finished else ("", ())
        message = None
        if text or token_ids:
            message = self._parser.extract_tool_calls_streaming(
                previous_text, self._text, text, previous_ids, self._token_ids, list(token_ids), self._request
            )
        content = (message.content or "") if message is not None else ""
        deltas = [self._delta(call) for call in (message.tool_calls if message is not None else ())]
        if finished and self.called:
            # The parser may hold back the end of the last call's arguments until it sees more text.
            rest = self._parser.get_remaining_unstreamed_args()
            if rest:
                deltas.append(ToolCallDelta(max(self._sent), arguments=rest))
        return content, tuple(deltas)

    def _delta(self, call: Any) -> ToolCallDelta:
        function = call.function
        if isinstance(function, Mapping):
            name, arguments = function.get("name"), function.get("arguments")
        else:
            name = getattr(function, "name", None)
            arguments = getattr(function, "arguments", None)
        self.called = True
        self._sent[call.index] = self._sent.get(call.index, "") + (arguments or "")
        return ToolCallDelta(call.index, id=call.id or "", name=name or "", arguments=arguments or "")

    def _whole(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        info = self._parser.extract_tool_calls(self._text, self._request)
        if not info.tools_called:
            return info.content or "", ()
        self.called = True
        return info.content or "", tuple(
            ToolCallDelta(
                i, id=call.id or new_call_id(), name=call.function.name, arguments=call.function.arguments
            )
            for i, call in enumerate(info.tool_calls)
        )


def vllm_tool_parser_names() -> list[str]:
    """The names vLLM's ToolParserManager knows (registered and lazily loaded), sorted. Imports
    vLLM: the registry asks a child process (llmesh.registry.tool_parsers), the worker itself."""
    from vllm.tool_parsers import ToolParserManager

    return sorted({*ToolParserManager.tool_parsers, *ToolParserManager.lazy_parsers})


class VllmToolParsers:
    """vLLM's tool parser of one model: a reader per choice, and what the parser asks of sampling."""

    def __init__(self, parser_name: str, tokenizer: Any, model: str) -> None:
        from vllm.tool_parsers import ToolParserManager

        self._class = ToolParserManager.get_tool_parser(parser_name)
        self._tokenizer, self._model = tokenizer, model

    def _request(self, tools: Sequence[Mapping[str, Any]], choice: ToolChoice) -> Any:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest.model_validate(
            {
                "model": self._model,
                "messages": [{"role": "user", "content": ""}],
                "tools": [dict(t) for t in tools],
                "tool_choice": "auto",
                "parallel_tool_calls": choice.parallel,
            }
        )

    def _parser(self, request: Any) -> Any:
        return self._class(self._tokenizer, request.tools)

    def reader(self, tools: Sequence[Mapping[str, Any]], choice: ToolChoice) -> ParserReader:
        request = self._request(tools, choice)
        return ParserReader(self._parser(request), request, choice.streaming)

    def keeps_special_tokens(self, tools: Sequence[Mapping[str, Any]], choice: ToolChoice) -> bool:
        """Whether the parser needs special tokens left in the text (some models mark their
        tool-call tags special; vLLM's parser says so by adjusting the request)."""
        request = self._request(tools, choice)
        return self._parser(request).adjust_request(request).skip_special_tokens is False


def reader_for(
    choice: ToolChoice, tools: Sequence[Mapping[str, Any]], auto: VllmToolParsers | None
) -> ToolReader:
    """The reader of one choice; `auto` makes the parser readers of tool_choice "auto"."""
    if choice.mode == "named":
        return NamedCallReader(choice.function)
    if choice.mode == "required":
        return RequiredCallsReader()
    if auto is None:
        raise InvalidRequest("tool_choice 'auto' needs a model served with a tool_parser")
    return auto.reader(tools, choice)


async def read_tool_calls(
    chunks: AsyncGenerator[GenerationChunk, None],
    choice: ToolChoice,
    tools: Sequence[Mapping[str, Any]],
    auto: VllmToolParsers | None,
) -> AsyncIterator[GenerationChunk]:
    """The engine's chunks with each choice's text split into content and tool-call fragments; a
    choice that stopped after calling a tool ends with finish_reason "tool_calls"."""
    readers: dict[int, ToolReader] = {}
    ends: dict[int, str | None] = {}
    async with contextlib.aclosing(chunks):  # leaving early aborts the engine request at once
        async for chunk in chunks:
            deltas = []
            for d in chunk.choices:
                if d.index in ends:  # the last chunk repeats ends reported before (n > 1)
                    deltas.append(replace(d, finish_reason=ends[d.index]))
                    continue
                reader = readers.get(d.index)
                if reader is None:
                    reader = readers[d.index] = reader_for(choice, tools, auto)
                content, calls = reader.feed(d.text, d.token_ids, d.finish_reason is not None)
                reason = "tool_calls" if d.finish_reason == "stop" and reader.called else d.finish_reason
                if d.finish_reason is not None:
                    ends[d.index] = reason
                deltas.append(replace(d, text=content, tool_calls=calls, finish_reason=reason))
            yield replace(chunk, choices=tuple(deltas))


def template_message(message: ChatMessage) -> dict[str, Any]:
    """One chat turn as chat templates read it (the shape of transformers' tool-use templates)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _arguments(text: str) -> Any:
    """Templates expect the arguments as an object (they print it with tojson); JSON text that is
    not an object stays text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def compact_json_grammar(schema: str) -> str | None:
    """The JSON schema of a forced call as an EBNF grammar without free whitespace, or None when
    xgrammar cannot convert it.

    vLLM 0.32 ignores StructuredOutputsParams.disable_any_whitespace per request (its xgrammar
    backend reads only the engine-wide setting), and a weak model then pads the JSON with
    whitespace until max_tokens: the call would not be valid JSON. A grammar is compiled as given.
    """
    import xgrammar

    try:
        grammar = xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    except Exception:  # a schema feature xgrammar lacks: vLLM's own backend choice handles it
        return None
    return str(grammar)
