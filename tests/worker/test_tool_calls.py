"""Reading tool calls out of generated text: forced calls (named, required), vLLM's own hermes
parser (streaming and whole), the stream wrapper's finish reasons, and chat turns as templates
read them."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import pytest

from llmesh.worker import convert
from llmesh.worker.engine import (
    ChatMessage,
    ChoiceDelta,
    GenerationChunk,
    GenerationInput,
    GenerationRequest,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from llmesh.worker.tool_calls import (
    NamedCallReader,
    RequiredCallsReader,
    VllmToolParsers,
    read_tool_calls,
    template_message,
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def joined(deltas: Sequence[ToolCallDelta]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        call["id"] += d.id
        call["name"] += d.name
        call["arguments"] += d.arguments
    return calls


def test_named_reader_streams_the_output_as_arguments_of_call_zero() -> None:
    reader = NamedCallReader("get_weather")
    first = reader.feed('{"city"', (1, 2), False)
    rest = reader.feed(': "Rome"}', (3,), True)
    assert first[0] == "" and first[1][0].id.startswith("call_") and first[1][0].name == "get_weather"
    assert rest[1] == (ToolCallDelta(0, arguments=': "Rome"}'),)
    assert reader.called
    assert joined([*first[1], *rest[1]])[0]["arguments"] == '{"city": "Rome"}'


def test_required_reader_reads_the_list_of_calls_at_the_end() -> None:
    reader = RequiredCallsReader()
    assert reader.feed('[{"name": "get_weather", ', (), False) == ("", ())
    content, calls = reader.feed(
        '"parameters": {"city": "Paris"}}, {"name": "t", "parameters": {}}]', (), True
    )
    assert content == "" and reader.called
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"}),
        (1, "t", {}),
    ]
    assert len({c.id for c in calls}) == 2
    cut = RequiredCallsReader()  # max_tokens cut the JSON: the client gets the text, no calls
    assert cut.feed('[{"name": "get_wea', (), True) == ('[{"name": "get_wea', ())
    assert not cut.called


async def engine_chunks(chunks: Sequence[GenerationChunk]) -> AsyncGenerator[GenerationChunk, None]:
    for chunk in chunks:
        yield chunk


async def test_stream_wrapper_ends_called_choices_with_tool_calls() -> None:
    chunks = [
        GenerationChunk((ChoiceDelta(0, '{"a":'), ChoiceDelta(1, "{}", finish_reason="length")), 5, 2, False),
        GenerationChunk((ChoiceDelta(0, " 1}", finish_reason="stop"),), 5, 3, False),
        # vLLM's last chunk names every choice's end again (n > 1).
        GenerationChunk(
            (ChoiceDelta(0, "", finish_reason="stop"), ChoiceDelta(1, "", finish_reason="length")), 5, 3, True
        ),
    ]
    choice = ToolChoice(mode="named", function="f")
    seen = [c async for c in read_tool_calls(engine_chunks(chunks), choice, TOOLS, None)]
    assert [[d.finish_reason for d in c.choices] for c in seen] == [
        [None, "length"],
        ["tool_calls"],
        ["tool_calls", "length"],
    ]
    assert all(d.text == "" for c in seen for d in c.choices)
    assert (
        joined([t for c in seen for d in c.choices if d.index == 0 for t in d.tool_calls])[0]["arguments"]
        == '{"a": 1}'
    )


def test_template_turns_carry_calls_with_object_arguments_and_answered_ids() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    assert template_message(ChatMessage("assistant", "", tool_calls=(call,))) == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    assert template_message(ChatMessage("tool", "Sunny", tool_call_id="call_1")) == {
        "role": "tool",
        "content": "Sunny",
        "tool_call_id": "call_1",
    }
    odd = template_message(ChatMessage("assistant", "", tool_calls=(ToolCall("c", "f", "not json"),)))
    assert odd["tool_calls"][0]["function"]["arguments"] == "not json"


def test_with_tools_puts_tools_calls_and_choice_on_the_engine_request() -> None:
    chat = GenerationInput.messages(
        [ChatMessage("user", "hi"), ChatMessage("assistant", ""), ChatMessage("tool", "ok")]
    )
    request = GenerationRequest("r", "m", chat)
    call = ToolCall("c1", "f", "{}")
    choice = ToolChoice(mode="required")
    out = convert.with_tools(request, TOOLS, choice, [((), ""), ((call,), ""), ((), "c1")])
    assert out.tool_choice == choice and out.input.tools == tuple(TOOLS)
    assert out.input.chat is not None
    assert [(m.tool_calls, m.tool_call_id) for m in out.input.chat] == [((), ""), ((call,), ""), ((), "c1")]


@pytest.fixture(scope="module")
def hermes() -> VllmToolParsers:
    """vLLM's hermes parser on the tiny model's tokenizer (no engine)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[cpu]')")
    from transformers import AutoTokenizer

    from llmesh.worker.tiny_model import build_tiny_model

    path = build_tiny_model(Path.home() / ".cache" / "llmesh-tests" / "tiny-llama", show_progress=False)
    return VllmToolParsers("hermes", AutoTokenizer.from_pretrained(path), "m")


OUTPUT = 'Let me see. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_hermes_parser_streams_content_then_call_fragments(hermes: VllmToolParsers) -> None:
    reader = hermes.reader(TOOLS, ToolChoice(mode="auto"))
    # vLLM's hermes parser asks for special tokens in the text (its tags are special in some models).
    assert hermes.keeps_special_tokens(TOOLS, ToolChoice(mode="auto"))
    content, deltas = "", []
    pieces = [OUTPUT[i : i + 7] for i in range(0, len(OUTPUT), 7)]
    for i, piece in enumerate(pieces):
        text, calls = reader.feed(piece, (i,), i == len(pieces) - 1)
        content += text
        deltas.extend(calls)
    assert content == "Let me see. " and reader.called
    [call] = joined(deltas).values()
    assert call["name"] == "get_weather" and call["id"]
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert len([d for d in deltas if d.arguments]) > 1  # the arguments came in pieces


def test_hermes_parser_reads_a_unary_answer_whole(hermes: VllmToolParsers) -> None:
    reader = hermes.reader(TOOLS, ToolChoice(mode="auto", streaming=False))
    assert reader.feed(OUTPUT[:30], (1,), False) == ("", ())
    content, calls = reader.feed(OUTPUT[30:], (2,), True)
    assert content == "Let me see. " and [(c.index, c.name) for c in calls] == [(0, "get_weather")]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    plain = hermes.reader(TOOLS, ToolChoice(mode="auto", streaming=False))
    assert plain.feed("just text", (1,), True) == ("just text", ()) and not plain.called


def test_forced_call_schemas_become_grammars_without_free_whitespace() -> None:
    pytest.importorskip("xgrammar")
    from llmesh.worker.tool_calls import compact_json_grammar

    schema = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}
    schema |= {"required": ["zone"], "additionalProperties": False}
    grammar = compact_json_grammar(json.dumps(schema))
    assert grammar is not None
    # The root is the object itself, nothing between its parts (with whitespace it would allow [ \n\t]*).
    assert 'root ::= (("{" "\\"zone\\"" ":" root_prop_0 "}"))' in grammar
