"""OpenAI-shaped requests → the worker's GenerateRequest, validated with messages that say what to fix."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, struct_pb2

from llmesh.common.errors import InvalidRequest
from llmesh.common.v1 import common_pb2
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.worker.engine import ToolCall, ToolChoice
from llmesh.worker.tool_calls import required_calls_schema
from llmesh.worker.v1 import worker_service_pb2 as worker_pb

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_STOP_SEQUENCES = 4
PRIORITIES = {"": 2, "normal": 2, "low": 1, "high": 3}


@dataclass(frozen=True)
class ModelLimits:
    """What the catalog says a request for this model may ask."""

    name: str
    max_output_tokens: int
    max_model_len: int


@dataclass(frozen=True)
class ChatTools:
    """What tools add to a chat, beside the worker's GenerateRequest (whose chat turns carry text).

    `tools` are rendered by the chat template (none for tool_choice "none"); `choice` is None when
    no calls are looked for; `turns` holds each message's (tool_calls, tool_call_id)."""

    tools: tuple[dict[str, Any], ...]
    choice: ToolChoice | None
    turns: tuple[tuple[tuple[ToolCall, ...], str], ...]


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request ready to dispatch, with what the scheduler needs to know."""

    generate: worker_pb.GenerateRequest
    prompt_estimate: int
    max_tokens: int
    priority: int
    include_usage: bool
    echo_text: str = ""
    chat_tools: ChatTools | None = None


def _text_of(content: struct_pb2.Value, where: str) -> str:
    """A message's content: a string, or a list of text parts (other part types are refused)."""
    kind = content.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return ""
    if kind == "string_value":
        return content.string_value
    if kind == "list_value":
        parts: list[str] = []
        for i, part in enumerate(content.list_value.values):
            if part.WhichOneof("kind") != "struct_value":
                raise InvalidRequest(f"{where}.content[{i}] must be an object like {{'type': 'text', ...}}")
            fields = part.struct_value.fields
            ptype = fields["type"].string_value if "type" in fields else ""
            if ptype != "text":
                raise InvalidRequest(
                    f"{where}.content[{i}] has type {ptype!r}; only 'text' content parts are supported"
                )
            parts.append(fields["text"].string_value if "text" in fields else "")
        return "".join(parts)
    raise InvalidRequest(f"{where}.content must be a string or a list of text parts")


def _stop_list(stop: struct_pb2.Value) -> list[str]:
    kind = stop.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return []
    if kind == "string_value":
        values = [stop.string_value]
    elif kind == "list_value" and all(v.WhichOneof("kind") == "string_value" for v in stop.list_value.values):
        values = [v.string_value for v in stop.list_value.values]
    else:
        raise InvalidRequest("stop must be a string or a list of strings")
    if len(values) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop accepts at most {MAX_STOP_SEQUENCES} sequences; got {len(values)}")
    if any(not v for v in values):
        raise InvalidRequest("stop sequences must not be empty strings")
    return values


def _priority(name: str) -> int:
    try:
        return PRIORITIES[name]
    except KeyError:
        raise InvalidRequest(f"priority must be 'low', 'normal' or 'high'; got {name!r}") from None


def _max_tokens(requested: int | None, limits: ModelLimits, default: int) -> int:
    if requested is None:
        return min(default, limits.max_output_tokens)
    if requested < 1:
        raise InvalidRequest(f"max_tokens must be at least 1; got {requested}")
    if requested > limits.max_output_tokens:
        raise InvalidRequest(
            f"max_tokens {requested} is over the limit of model {limits.name!r} "
            f"({limits.max_output_tokens}); ask for at most {limits.max_output_tokens}"
        )
    return requested


def _structured(
    response_format: pb.ResponseFormat | None,
    guided_json: struct_pb2.Struct | None,
    guided_regex: str,
    guided_choice: Sequence[str],
) -> common_pb2.StructuredOutput:
    chosen: list[common_pb2.StructuredOutput] = []
    if response_format is not None and response_format.type not in ("", "text"):
        if response_format.type == "json_object":
            chosen.append(common_pb2.StructuredOutput(json_object=True))
        elif response_format.type == "json_schema":
            if not response_format.json_schema.HasField("schema"):
                raise InvalidRequest("response_format.json_schema.schema is required for type 'json_schema'")
            schema = json_format.MessageToDict(response_format.json_schema.schema)
            chosen.append(common_pb2.StructuredOutput(json_schema=json.dumps(schema)))
        else:
            raise InvalidRequest(
                f"response_format.type {response_format.type!r} is not supported; "
                "use 'text', 'json_object' or 'json_schema'"
            )
    if guided_json is not None:
        chosen.append(
            common_pb2.StructuredOutput(json_schema=json.dumps(json_format.MessageToDict(guided_json)))
        )
    if guided_regex:
        chosen.append(common_pb2.StructuredOutput(regex=guided_regex))
    if guided_choice:
        chosen.append(common_pb2.StructuredOutput(choice=common_pb2.ChoiceList(values=list(guided_choice))))
    if len(chosen) > 1:
        raise InvalidRequest(
            "use only one of response_format, guided_json, guided_regex and guided_choice per request"
        )
    return chosen[0] if chosen else common_pb2.StructuredOutput()


def _common_sampling(
    req: pb.CreateChatCompletionRequest | pb.CreateCompletionRequest, max_tokens: int
) -> common_pb2.SamplingParams:
    """Sampling fields both OpenAI APIs share; range checks happen in the worker's engine layer."""
    sp = common_pb2.SamplingParams(max_tokens=max_tokens)
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "seed",
        "n",
        "min_tokens",
        "skip_special_tokens",
    ):
        if req.HasField(name):
            setattr(sp, name, getattr(req, name))
    sp.stop.extend(_stop_list(req.stop))
    sp.stop_token_ids.extend(req.stop_token_ids)
    sp.ignore_eos = req.ignore_eos
    sp.include_stop_str_in_output = req.include_stop_str_in_output
    for key, bias in req.logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if token_id < 0 or str(token_id) != key.strip():
            raise InvalidRequest(f"logit_bias keys must be token ids (non-negative integers); got {key!r}")
        sp.logit_bias[token_id] = bias
    return sp


def _refuse_unsupported_chat_fields(req: pb.CreateChatCompletionRequest) -> None:
    """OpenAI fields the contract carries only to refuse them by name (see the proto)."""
    unsupported = [
        name
        for name in ("audio", "prediction", "web_search_options", "functions", "function_call")
        if req.HasField(name)
    ]
    if req.reasoning_effort:
        unsupported.append("reasoning_effort")
    if req.metadata:
        unsupported.append("metadata")
    if unsupported:
        raise InvalidRequest(
            f"{', '.join(unsupported)} {'is' if len(unsupported) == 1 else 'are'} not supported by llmesh; "
            "remove it from the request"
        )
    if any(m != "text" for m in req.modalities):
        raise InvalidRequest(f"modalities {list(req.modalities)} is not supported; only ['text'] is")
    if req.HasField("store") and req.store:
        raise InvalidRequest("store=true is not supported: llmesh does not store completions; remove it")
    if req.service_tier not in ("", "auto", "default"):
        raise InvalidRequest(
            f"service_tier {req.service_tier!r} is not supported; use 'auto' or 'default', or omit it"
        )


def prepare_chat(
    req: pb.CreateChatCompletionRequest, limits: ModelLimits, request_id: str, *, streaming: bool = True
) -> PreparedRequest:
    """Validate a chat completion request and build the worker request (`streaming`: the answer
    is streamed, so tool calls are parsed as they come)."""
    if not req.messages:
        raise InvalidRequest(
            "messages is empty; send at least one message, e.g. {'role':'user','content':'Hi'}"
        )
    _refuse_unsupported_chat_fields(req)
    turns: list[common_pb2.ChatTurn] = []
    call_turns: list[tuple[tuple[ToolCall, ...], str]] = []
    chars = 0
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"{where}.role {m.role!r} is not one of {sorted(CHAT_ROLES)}")
        call_turns.append(_turn_tools(m, where))
        text = _text_of(m.content, where)
        chars += len(text)
        # "developer" is OpenAI's newer name for "system"; chat templates know "system".
        role = "system" if m.role == "developer" else m.role
        turns.append(common_pb2.ChatTurn(role=role, content=text, name=m.name))
    requested = req.max_completion_tokens if req.HasField("max_completion_tokens") else None
    if requested is None and req.HasField("max_tokens"):
        requested = req.max_tokens
    max_tokens = _max_tokens(requested, limits, default=limits.max_output_tokens)
    sampling = _common_sampling(req, max_tokens)
    sampling.logprobs = req.logprobs
    if req.HasField("top_logprobs"):
        sampling.top_logprobs = req.top_logprobs
    sampling.structured_output.CopyFrom(
        _structured(
            req.response_format if req.HasField("response_format") else None,
            req.guided_json if req.HasField("guided_json") else None,
            req.guided_regex,
            req.guided_choice,
        )
    )
    tools = _tools(req)
    choice = _tool_choice(req, tools, streaming)
    if choice is not None and choice.mode != "auto":
        if sampling.structured_output.WhichOneof("constraint") is not None:
            raise InvalidRequest(
                "tool_choice 'required' or a named function constrains the output to the call's JSON; "
                "remove response_format/guided_* from the request, or use tool_choice 'auto'"
            )
        sampling.structured_output.json_schema = json.dumps(_call_schema(choice, tools))
    chat_tools = None
    if tools or any(calls or call_id for calls, call_id in call_turns):
        rendered = tuple(tools) if choice is not None else ()
        chat_tools = ChatTools(tools=rendered, choice=choice, turns=tuple(call_turns))
    generate = worker_pb.GenerateRequest(
        request_id=request_id,
        model=limits.name,
        chat=worker_pb.ChatInput(
            messages=turns,
            add_generation_prompt=req.add_generation_prompt
            if req.HasField("add_generation_prompt")
            else True,
            chat_template=req.chat_template,
        ),
        sampling=sampling,
    )
    return PreparedRequest(
        generate=generate,
        prompt_estimate=chars // 4 + 8 * len(turns),
        max_tokens=max_tokens,
        priority=_priority(req.priority),
        include_usage=req.stream_options.include_usage,
        chat_tools=chat_tools,
    )


# OpenAI's rule for function names.
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_CHOICES = ("none", "auto", "required")


def _tools(req: pb.CreateChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's tools as OpenAI tool objects (what chat templates read), checked."""
    tools: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(req.tools):
        where = f"tools[{i}]"
        if tool.type != "function":
            raise InvalidRequest(f"{where}.type must be 'function'; got {tool.type!r}")
        name = tool.function.name
        if not _FUNCTION_NAME.match(name):
            raise InvalidRequest(
                f"{where}.function.name {name!r} must be 1 to 64 letters, digits, underscores or dashes"
            )
        if name in names:
            raise InvalidRequest(f"{where}.function.name {name!r} is given twice; tool names must be unique")
        names.add(name)
        function: dict[str, Any] = {"name": name}
        if tool.function.description:
            function["description"] = tool.function.description
        if tool.function.HasField("parameters"):
            parameters = json_format.MessageToDict(tool.function.parameters)
            if parameters.get("type") != "object":
                raise InvalidRequest(
                    f"{where}.function.parameters must be a JSON Schema of type 'object' (the arguments "
                    f"are an object); got type {parameters.get('type')!r}"
                )
            function["parameters"] = parameters
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(
    req: pb.CreateChatCompletionRequest, tools: list[dict[str, Any]], streaming: bool
) -> ToolChoice | None:
    """How tools are used; None when the model sees no tools ("none", or no tools given)."""
    parallel = req.parallel_tool_calls if req.HasField("parallel_tool_calls") else True
    value = req.tool_choice
    kind = value.WhichOneof("kind") if req.HasField("tool_choice") else None
    if kind is None or kind == "null_value":
        mode, function = ("auto" if tools else "none"), ""
    elif kind == "string_value" and value.string_value in TOOL_CHOICES:
        mode, function = value.string_value, ""
    elif kind == "struct_value":
        fields = json_format.MessageToDict(value.struct_value)
        name = fields.get("function", {}).get("name") if isinstance(fields.get("function"), dict) else None
        if fields.get("type") != "function" or not isinstance(name, str):
            raise InvalidRequest(
                "tool_choice as an object must be {'type': 'function', 'function': {'name': '...'}}"
            )
        mode, function = "named", name
    else:
        raise InvalidRequest(
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': '...'}}"
        )
    if mode == "none":
        return None
    if not tools:
        raise InvalidRequest(f"tool_choice {value.string_value or function!r} needs tools; send 'tools'")
    if mode == "named" and function not in {t["function"]["name"] for t in tools}:
        known = sorted(t["function"]["name"] for t in tools)
        raise InvalidRequest(f"tool_choice names function {function!r}, which is not in tools ({known})")
    return ToolChoice(mode=mode, function=function, parallel=parallel, streaming=streaming)


def _call_schema(choice: ToolChoice, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema the output keeps to for tool_choice "required" or a named function."""
    if choice.mode == "named":
        function = next(t["function"] for t in tools if t["function"]["name"] == choice.function)
        return dict(function.get("parameters") or {"type": "object", "properties": {}})
    return required_calls_schema(tools, choice.parallel)


def _turn_tools(m: pb.ChatMessage, where: str) -> tuple[tuple[ToolCall, ...], str]:
    """A message's tool calls (assistant) or the call it answers (tool), checked."""
    if m.tool_calls and m.role != "assistant":
        raise InvalidRequest(f"{where}.tool_calls is only for assistant messages; this one is {m.role!r}")
    if m.role == "tool" and not m.tool_call_id:
        raise InvalidRequest(
            f"{where} has role 'tool' but no tool_call_id; set it to the id of the call it answers"
        )
    if m.tool_call_id and m.role != "tool":
        raise InvalidRequest(f"{where}.tool_call_id is only for tool messages; this one is {m.role!r}")
    calls = []
    for j, call in enumerate(m.tool_calls):
        if call.type not in ("", "function"):
            raise InvalidRequest(f"{where}.tool_calls[{j}].type must be 'function'; got {call.type!r}")
        if not call.id or not call.function.name:
            raise InvalidRequest(f"{where}.tool_calls[{j}] needs an id and function.name")
        calls.append(ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments))
    return tuple(calls), m.tool_call_id


def _completion_prompt(prompt: struct_pb2.Value) -> str | list[int]:
    """OpenAI's prompt: a string, a list of token ids, or a one-element list of either."""
    kind = prompt.WhichOneof("kind")
    if kind == "string_value":
        return prompt.string_value
    if kind == "list_value":
        values = list(prompt.list_value.values)
        if values and all(v.WhichOneof("kind") == "number_value" for v in values):
            ids = [int(v.number_value) for v in values]
            if any(i < 0 or i != v.number_value for i, v in zip(ids, values, strict=True)):
                raise InvalidRequest("prompt token ids must be non-negative integers")
            return ids
        if len(values) == 1:
            return _completion_prompt(values[0])
        if len(values) > 1:
            raise InvalidRequest("batched prompts are not supported; send one prompt per request")
    raise InvalidRequest("prompt is required: a string or a list of token ids")


def prepare_completion(
    req: pb.CreateCompletionRequest, limits: ModelLimits, request_id: str
) -> PreparedRequest:
    """Validate a text completion request and build the worker request."""
    prompt = _completion_prompt(req.prompt)
    if prompt == "":
        raise InvalidRequest("prompt is empty; send the text to complete")
    if req.suffix:
        raise InvalidRequest("suffix is not supported; remove it from the request")
    if req.HasField("best_of") and req.best_of != (req.n if req.HasField("n") else 1):
        raise InvalidRequest("best_of must equal n (server-side candidates are not supported)")
    if req.echo and not isinstance(prompt, str):
        raise InvalidRequest("echo needs a text prompt, not token ids")
    # OpenAI's completions API defaults max_tokens to 16.
    max_tokens = _max_tokens(req.max_tokens if req.HasField("max_tokens") else None, limits, default=16)
    sampling = _common_sampling(req, max_tokens)
    if req.HasField("logprobs"):
        if req.logprobs > 5:
            raise InvalidRequest(f"logprobs must be in [0, 5]; got {req.logprobs}")
        sampling.logprobs = True
        sampling.top_logprobs = req.logprobs
    sampling.structured_output.CopyFrom(
        _structured(
            None,
            req.guided_json if req.HasField("guided_json") else None,
            req.guided_regex,
            req.guided_choice,
        )
    )
    generate = worker_pb.GenerateRequest(request_id=request_id, model=limits.name, sampling=sampling)
    if isinstance(prompt, str):
        generate.prompt = prompt
        estimate = len(prompt) // 4 + 1
    else:
        generate.prompt_token_ids.ids.extend(prompt)
        estimate = len(prompt)
    return PreparedRequest(
        generate=generate,
        prompt_estimate=estimate,
        max_tokens=max_tokens,
        priority=_priority(req.priority),
        include_usage=req.stream_options.include_usage,
        echo_text=prompt if req.echo and isinstance(prompt, str) else "",
    )


# OpenAI's own limit on inputs per embeddings request.
MAX_EMBEDDING_INPUTS = 2048
EMBEDDING_FORMATS = frozenset({"", "float", "base64"})


@dataclass(frozen=True)
class PreparedEmbeddings:
    """A validated embeddings request: each input is a text or a list of token ids."""

    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str  # "float" or "base64"
    dimensions: int | None


def _token_ids(values: Sequence[struct_pb2.Value], where: str) -> tuple[int, ...]:
    ids = []
    for v in values:
        number = v.number_value
        if v.WhichOneof("kind") != "number_value" or number < 0 or number != int(number):
            raise InvalidRequest(f"{where} must hold non-negative integer token ids")
        ids.append(int(number))
    if not ids:
        raise InvalidRequest(f"{where} is an empty list of token ids; send at least one token")
    return tuple(ids)


def _embedding_inputs(value: struct_pb2.Value) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's `input`: a string, a list of strings, a list of token ids, or a list of such lists."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        raise InvalidRequest("input is required: a string, a list of strings or a list of token ids")
    if kind == "string_value":
        items: list[struct_pb2.Value] = [value]
    elif kind == "list_value":
        items = list(value.list_value.values)
        if not items:
            raise InvalidRequest("input is an empty list; send at least one string or token id list")
        if all(v.WhichOneof("kind") == "number_value" for v in items):
            return (_token_ids(items, "input"),)
    else:
        raise InvalidRequest("input must be a string, a list of strings or a list of token ids")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(
            f"input has {len(items)} items; at most {MAX_EMBEDDING_INPUTS} per request, send the rest "
            "in further requests"
        )
    inputs: list[str | tuple[int, ...]] = []
    for i, item in enumerate(items):
        where = "input" if kind == "string_value" else f"input[{i}]"
        item_kind = item.WhichOneof("kind")
        if item_kind == "string_value":
            if not item.string_value:
                raise InvalidRequest(f"{where} is an empty string; embeddings need some text")
            inputs.append(item.string_value)
        elif item_kind == "list_value":
            inputs.append(_token_ids(item.list_value.values, where))
        else:
            raise InvalidRequest(f"{where} must be a string or a list of token ids")
    return tuple(inputs)


def prepare_embeddings(req: pb.CreateEmbeddingsRequest) -> PreparedEmbeddings:
    """Validate an embeddings request (the model's own limits are the engine's to check)."""
    if req.encoding_format not in EMBEDDING_FORMATS:
        raise InvalidRequest(f"encoding_format must be 'float' or 'base64'; got {req.encoding_format!r}")
    dimensions = req.dimensions if req.HasField("dimensions") else None
    if dimensions is not None and dimensions < 1:
        raise InvalidRequest(f"dimensions must be at least 1; got {dimensions}")
    return PreparedEmbeddings(
        inputs=_embedding_inputs(req.input),
        encoding_format=req.encoding_format or "float",
        dimensions=dimensions,
    )
