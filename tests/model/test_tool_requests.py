"""Tool calling in the OpenAI mapping: requests with tools checked and turned into the worker's
request (rendered tools, how calls are looked for, the JSON schema of forced calls), and tool-call
fragments turned into OpenAI's message and chunk shapes."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from llmesh.common.errors import InvalidRequest
from llmesh.model import openai_responses as out
from llmesh.model.openai_requests import ModelLimits, PreparedRequest, prepare_chat
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.worker.engine import ChoiceDelta, ToolCall, ToolCallDelta, ToolChoice
from tests.scripted_stack import chat, engine

LIMITS = ModelLimits(name="m", max_output_tokens=100, max_model_len=1000)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = {"role": "user", "content": "Weather in Paris?"}


def prepare(streaming: bool = True, **body: Any) -> PreparedRequest:
    request = json_format.ParseDict(
        {"model": "m", "messages": [USER], **body}, pb.CreateChatCompletionRequest()
    )
    return prepare_chat(request, LIMITS, "r1", streaming=streaming)


def schema_of(prepared: PreparedRequest) -> Any:
    return json.loads(prepared.generate.sampling.structured_output.json_schema)


def test_tools_are_rendered_and_auto_is_the_default() -> None:
    prepared = prepare(tools=[WEATHER, TIME], parallel_tool_calls=False)
    tools = prepared.chat_tools
    assert tools is not None and tools.tools == (WEATHER, TIME)
    assert tools.choice == ToolChoice(mode="auto", parallel=False, streaming=True)
    # "auto" leaves the output free: the model's tool parser finds the calls.
    assert prepared.generate.sampling.structured_output.WhichOneof("constraint") is None
    assert prepare(streaming=False, tools=[WEATHER]).chat_tools.choice.streaming is False  # type: ignore[union-attr]


def test_required_constrains_the_output_to_a_list_of_calls() -> None:
    schema = schema_of(prepare(tools=[WEATHER, TIME], tool_choice="required"))
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    variants = schema["items"]["anyOf"]
    assert [v["properties"]["name"]["enum"] for v in variants] == [["get_weather"], ["get_time"]]
    assert variants[0]["properties"]["parameters"] == WEATHER["function"]["parameters"]  # type: ignore[index]
    # A function without parameters takes an empty object.
    assert variants[1]["properties"]["parameters"]["type"] == "object"
    single = schema_of(prepare(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False))
    assert single["maxItems"] == 1


def test_a_named_function_constrains_the_output_to_its_arguments() -> None:
    prepared = prepare(
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert schema_of(prepared) == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert prepared.chat_tools.choice == ToolChoice(mode="named", function="get_weather")  # type: ignore[union-attr]


def test_none_renders_no_tools_and_looks_for_no_calls() -> None:
    tools = prepare(tools=[WEATHER], tool_choice="none").chat_tools
    assert tools is not None and tools.tools == () and tools.choice is None
    assert prepare().chat_tools is None  # no tools, no tool turns: nothing to add


def test_calls_and_results_in_the_history_reach_the_template() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [call]}]
    messages.append({"role": "tool", "tool_call_id": "call_1", "content": "Sunny"})
    tools = prepare(messages=messages).chat_tools
    assert tools is not None and tools.choice is None
    assert tools.turns == (
        ((), ""),
        ((ToolCall("call_1", "get_weather", '{"city":"Paris"}'),), ""),
        ((), "call_1"),
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools[0].type must be 'function'"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name 'a b'"),
        ({"tools": [TIME, TIME]}, "tools[1].function.name 'get_time' is given twice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters must be a JSON Schema of type 'object'",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
            "tool_choice names function 'get_stock', which is not in tools (['get_weather'])",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice as an object must be"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice must be 'none', 'auto', 'required'"),
        ({"tool_choice": "required"}, "tool_choice 'required' needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "remove response_format/guided_*",
        ),
        (
            {"messages": [USER, {"role": "tool", "content": "Sunny"}]},
            "messages[1] has role 'tool' but no tool_call_id",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
            "messages[0].tool_call_id is only for tool messages",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}
                ]
            },
            "messages[0].tool_calls is only for assistant messages",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
            "messages[0].tool_calls[0] needs an id and function.name",
        ),
    ],
)
def test_bad_tool_requests_name_the_problem(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        prepare(**body)
    assert message in str(caught.value)


def test_unary_answer_joins_fragments_into_whole_calls() -> None:
    acc = out.ResponseAccumulator()
    acc.add(
        [
            ChoiceDelta(
                0, "", tool_calls=(ToolCallDelta(0, id="call_a", name="get_weather", arguments='{"ci'),)
            )
        ]
    )
    acc.add([ChoiceDelta(0, "", tool_calls=(ToolCallDelta(0, arguments='ty": "Rome"}'),))])
    acc.add(
        [ChoiceDelta(0, "", tool_calls=(ToolCallDelta(1, id="call_b", name="get_time", arguments="{}"),))]
    )
    acc.add([ChoiceDelta(0, "", finish_reason="tool_calls")])
    [choice] = acc.chat_choices()
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.HasField("content")  # OpenAI: null content when only tools were called
    calls = [json_format.MessageToDict(c) for c in choice.message.tool_calls]
    assert calls == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    text_only = out.ResponseAccumulator()
    text_only.add([ChoiceDelta(0, "hello", finish_reason="stop")])
    assert text_only.chat_choices()[0].message.content == "hello"


def test_stream_chunks_carry_fragments_with_their_index() -> None:
    chunker = out.ChatChunker("chatcmpl-1", "m")
    first = chunker.chunk(
        [ChoiceDelta(0, "", tool_calls=(ToolCallDelta(0, id="call_a", name="f", arguments=""),))]
    )
    later = chunker.chunk([ChoiceDelta(0, "", tool_calls=(ToolCallDelta(0, arguments='{"a": 1}'),))])
    end = chunker.chunk([ChoiceDelta(0, "", finish_reason="tool_calls")])
    head = first.choices[0].delta
    assert not head.HasField("content") and head.role == "assistant"
    assert json_format.MessageToDict(head.tool_calls[0]) == {
        "id": "call_a",
        "type": "function",
        "function": {"name": "f"},
        "index": 0,
    }
    assert json_format.MessageToDict(later.choices[0].delta.tool_calls[0]) == {
        "function": {"arguments": '{"a": 1}'},
        "index": 0,
    }
    assert end.choices[0].finish_reason == "tool_calls" and not end.choices[0].delta.tool_calls


async def test_an_engine_without_tool_calling_refuses_tools_by_name(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = await stack_factory({"w0": engine()})
    request = chat(
        tools=[json_format.ParseDict(WEATHER, pb.Tool())],
        tool_choice=struct_pb2.Value(string_value="required"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.models.CreateChatCompletion(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "engine without tool calling" in (caught.value.details() or "")
    # tool_choice "none" leaves the tools out, which every engine can do.
    request.tool_choice.string_value = "none"
    assert (await stack.models.CreateChatCompletion(request)).choices[0].finish_reason in ("stop", "length")
