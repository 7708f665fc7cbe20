"""OpenAI-shaped requests → the worker's GenerateRequest, validated with messages that say what to fix."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf import json_format, struct_pb2

from llmesh.common.errors import InvalidRequest
from llmesh.common.v1 import common_pb2
from llmesh.model.v1 import model_service_pb2 as pb
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
class PreparedRequest:
    """A validated request ready to dispatch, with what the scheduler needs to know."""

    generate: worker_pb.GenerateRequest
    prompt_estimate: int
    max_tokens: int
    priority: int
    include_usage: bool
    echo_text: str = ""


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
    req: pb.CreateChatCompletionRequest, limits: ModelLimits, request_id: str
) -> PreparedRequest:
    """Validate a chat completion request and build the worker request."""
    if not req.messages:
        raise InvalidRequest(
            "messages is empty; send at least one message, e.g. {'role':'user','content':'Hi'}"
        )
    if len(req.tools.values) > 0:
        raise InvalidRequest("tools are not supported yet; remove 'tools' from the request")
    if req.HasField("tool_choice"):
        raise InvalidRequest("tool_choice is not supported yet (tools are not); remove it from the request")
    _refuse_unsupported_chat_fields(req)
    turns: list[common_pb2.ChatTurn] = []
    chars = 0
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"{where}.role {m.role!r} is not one of {sorted(CHAT_ROLES)}")
        if m.tool_calls or m.tool_call_id:
            field = "tool_calls" if m.tool_calls else "tool_call_id"
            raise InvalidRequest(f"{where}.{field} is not supported yet (tools are not); remove it")
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
    )


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
