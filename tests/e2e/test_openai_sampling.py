"""Every OpenAI sampling option, end to end: the official OpenAI SDK through the real Envoy, the
endpoint picker and a real vLLM worker on the tiny random-weight model.

Each test is built to fail if its option were dropped on the way to the engine: the option must
change what the engine does (a stop cuts a text that otherwise runs to `length`, a +100 logit bias
forces its token, the same seed repeats a temperature-1 sample that other seeds do not ...).
The tiny model's output is gibberish, so expectations come from the model itself: a greedy run
first, then the same request with the option.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import openai
import pytest

from tests.support import VllmStack, require

pytestmark = pytest.mark.vllm

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about the worker"}]
# The tiny model rarely says EOS, but a test that counts tokens must not depend on it.
LONG = {"ignore_eos": True}


def sdk(stack: VllmStack) -> openai.AsyncOpenAI:
    require(bool(stack.edge), "Envoy is not installed (pip install -e '.[edge]')")
    return openai.AsyncOpenAI(base_url=f"http://{stack.edge}/v1", api_key="unused", max_retries=0)


async def greedy(client: openai.AsyncOpenAI, model: str, max_tokens: int, **options: Any) -> Any:
    extra = {**LONG, **options.pop("extra_body", {})}
    return await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, extra_body=extra, **options
    )


def token_ids(stack: VllmStack, text: str) -> list[int]:
    with httpx.Client(base_url=f"http://{stack.edge}", timeout=60) as http:
        response = http.post(
            "/v1/tokenize", json={"model": stack.model, "prompt": text, "add_special_tokens": False}
        )
    assert response.status_code == 200, response.text
    return list(response.json()["tokens"])


async def test_logprobs_and_top_logprobs(vllm_stack: VllmStack) -> None:
    client = sdk(vllm_stack)
    reply = await greedy(client, vllm_stack.model, 6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    for position in content:
        assert len(position.top_logprobs) == 3 and position.logprob <= 0
        ranked = [t.logprob for t in position.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert position.logprob == pytest.approx(ranked[0], abs=1e-4)
    plain = await greedy(client, vllm_stack.model, 6)
    assert plain.choices[0].logprobs is None

    text = await client.completions.create(
        model=vllm_stack.model, prompt="The worker", max_tokens=4, temperature=0, logprobs=2, extra_body=LONG
    )
    legacy = text.choices[0].logprobs
    assert legacy is not None and len(legacy.tokens) == len(legacy.token_logprobs) == 4
    assert all(1 <= len(top) <= 2 for top in legacy.top_logprobs)


async def test_n_choices_unary_and_streamed_by_index(vllm_stack: VllmStack) -> None:
    client = sdk(vllm_stack)
    options: dict[str, Any] = dict(
        model=vllm_stack.model, messages=MESSAGES, n=3, max_tokens=6, temperature=1, seed=7, extra_body=LONG
    )
    reply = await client.chat.completions.create(**options)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert {c.finish_reason for c in reply.choices} == {"length"}
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1  # three samples, not one repeated
    assert reply.usage is not None and reply.usage.completion_tokens == 18

    stream = await client.chat.completions.create(stream=True, **options)
    streamed: dict[int, str] = {}
    finished: Counter[int] = Counter()
    async for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] += 1
                assert choice.finish_reason == "length"
    assert finished == {0: 1, 1: 1, 2: 1}
    assert [streamed[i] for i in range(3)] == texts  # same seed, same samples, by index


def stop_candidate(text: str) -> str:
    """Two printable ASCII characters from inside `text` (not its start), to stop on."""
    for i in range(2, len(text) - 1):
        piece = text[i : i + 2]
        if piece.isascii() and piece.isprintable() and piece.strip() == piece:
            return piece
    raise AssertionError(f"no ASCII stop string inside {text!r}")


async def test_stop_strings_cut_the_text_before_them(vllm_stack: VllmStack) -> None:
    client = sdk(vllm_stack)
    full = (await greedy(client, vllm_stack.model, 16)).choices[0]
    assert full.finish_reason == "length"
    stop = stop_candidate(full.message.content)
    expected = full.message.content[: full.message.content.index(stop)]

    reply = (await greedy(client, vllm_stack.model, 16, stop=[stop, "never-in-this-text"])).choices[0]
    assert reply.finish_reason == "stop"
    assert reply.message.content == expected and stop not in reply.message.content

    stream = await client.chat.completions.create(
        model=vllm_stack.model,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body=LONG,
    )
    pieces, reasons = [], []
    async for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == expected and reasons[-1] == "stop"


async def test_stop_token_ids_end_the_choice(vllm_stack: VllmStack) -> None:
    client = sdk(vllm_stack)
    positions = (await greedy(client, vllm_stack.model, 16, logprobs=True)).choices[0].logprobs.content
    tokens = [p.token for p in positions]
    chosen = None
    for k in range(2, len(tokens)):
        token = tokens[k]
        if token.isascii() and token.strip() and token not in tokens[:k]:
            ids = token_ids(vllm_stack, token)
            if len(ids) == 1:
                chosen = (k, ids[0])
                break
    assert chosen is not None, f"no token to stop on among {tokens!r}"
    k, stop_id = chosen
    before = (await greedy(client, vllm_stack.model, k)).choices[0].message.content

    reply = (await greedy(client, vllm_stack.model, 16, extra_body={"stop_token_ids": [stop_id]})).choices[0]
    assert reply.finish_reason == "stop"
    assert reply.message.content == before  # the stop token's text is not in the output
    assert getattr(reply, "stop_reason", None) == str(stop_id)


async def test_seed_repeats_a_sample_and_other_seeds_differ(vllm_stack: VllmStack) -> None:
    client = sdk(vllm_stack)

    async def sample(seed: int) -> str:
        reply = await client.chat.completions.create(
            model=vllm_stack.model,
            messages=MESSAGES,
            max_tokens=16,
            temperature=1,
            seed=seed,
            extra_body=LONG,
        )
        return str(reply.choices[0].message.content)

    first, again, other = await sample(1), await sample(1), await sample(2)
    assert first == again
    assert first != other


async def test_response_format_json_object_parses(vllm_stack: VllmStack) -> None:
    client = sdk(vllm_stack)
    plain = (await greedy(client, vllm_stack.model, 24)).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(plain)  # what the model says unconstrained is no JSON
    reply = await client.chat.completions.create(
        model=vllm_stack.model,
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_object"},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


async def test_response_format_json_schema_validates(vllm_stack: VllmStack) -> None:
    client = sdk(vllm_stack)
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    reply = await client.chat.completions.create(
        model=vllm_stack.model,
        messages=MESSAGES,
        max_tokens=64,
        temperature=1,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    value = json.loads(choice.message.content)
    assert set(value) == {"answer", "sure"}
    assert value["answer"] in ("yes", "no") and isinstance(value["sure"], bool)


async def test_max_completion_tokens_limits_the_output(vllm_stack: VllmStack) -> None:
    client = sdk(vllm_stack)
    reply = await client.chat.completions.create(
        model=vllm_stack.model, messages=MESSAGES, max_completion_tokens=3, temperature=0, extra_body=LONG
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
async def test_penalties_break_greedy_repetition(vllm_stack: VllmStack, penalty: str) -> None:
    client = sdk(vllm_stack)
    plain = await greedy(client, vllm_stack.model, 32, logprobs=True)
    penalized = await greedy(client, vllm_stack.model, 32, logprobs=True, **{penalty: 2.0})

    def most_repeated(reply: Any) -> int:
        return max(Counter(p.token for p in reply.choices[0].logprobs.content).values())

    # Greedy on the tiny model falls into a loop; the penalty pushes it out.
    assert most_repeated(plain) >= 8
    assert most_repeated(penalized) < most_repeated(plain)
    assert penalized.choices[0].message.content != plain.choices[0].message.content


async def test_logit_bias_forces_and_bans_tokens(vllm_stack: VllmStack) -> None:
    client = sdk(vllm_stack)
    (the,) = token_ids(vllm_stack, " the")
    forced = await greedy(client, vllm_stack.model, 5, logit_bias={str(the): 100})
    assert forced.choices[0].message.content == " the" * 5

    plain = await greedy(client, vllm_stack.model, 1, logprobs=True)
    first = plain.choices[0].logprobs.content[0].token
    (first_id,) = token_ids(vllm_stack, first)
    banned = await greedy(client, vllm_stack.model, 1, logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].token != first


async def test_stream_options_include_usage(vllm_stack: VllmStack) -> None:
    client = sdk(vllm_stack)

    async def chunks(**options: Any) -> list[Any]:
        stream = await client.chat.completions.create(
            model=vllm_stack.model, messages=MESSAGES, max_tokens=4, stream=True, extra_body=LONG, **options
        )
        return [chunk async for chunk in stream]

    with_usage = await chunks(stream_options={"include_usage": True})
    last = with_usage[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 4 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in with_usage[:-1])
    assert all(c.usage is None for c in await chunks())


@pytest.mark.parametrize(
    ("path", "fields", "named"),
    [
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
        ("/v1/chat/completions", {"store": True}, "store"),
        ("/v1/chat/completions", {"metadata": {"k": "v"}}, "metadata"),
        ("/v1/chat/completions", {"service_tier": "flex"}, "service_tier"),
        ("/v1/chat/completions", {"logit_bias": {"the": 5}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"7": 101}}, "logit_bias"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
    ],
)
def test_unsupported_fields_answer_400_naming_them(
    vllm_stack: VllmStack, path: str, fields: dict[str, Any], named: str
) -> None:
    require(bool(vllm_stack.edge), "Envoy is not installed (pip install -e '.[edge]')")
    base: dict[str, Any] = {"model": vllm_stack.model, "max_tokens": 2}
    base |= {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "The worker"}
    with httpx.Client(base_url=f"http://{vllm_stack.edge}", timeout=60) as http:
        response = http.post(path, json={**base, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert named in error["message"] and error["type"] == "invalid_request_error", error
    # What is supported stays accepted: the same request without the field succeeds.
    with httpx.Client(base_url=f"http://{vllm_stack.edge}", timeout=60) as http:
        assert http.post(path, json=base).status_code == 200
