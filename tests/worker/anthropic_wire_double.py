"""AnthropicWireDouble: a TEST DOUBLE of Anthropic's Messages API (POST /v1/messages, streamed).

No real Anthropic endpoint is reachable from tests, so this local server speaks the same wire
format (SSE events message_start, content_block_start/delta/stop, message_delta, message_stop,
and `error`; JSON error bodies `{"type": "error", "error": {...}}`) with scripted behaviour:

- it checks the key (`x-api-key` or `Authorization: Bearer`) and the `anthropic-version` header
  (401 / 400 as Anthropic answers);
- the reply is the words " w0", " w1", ... one per text delta, `reply_words` of them (end_turn), or
  fewer when `max_tokens` (max_tokens) or a `stop_sequences` entry (stop_sequence) cuts it;
- input_tokens counts the whitespace-separated words of the system prompt and messages;
- the requested model picks a fault: "missing" → 404, "busy" → 429 with retry-after: 7,
  "broken" → 500, "overloaded-midstream" → 2 deltas then an overloaded_error event,
  "slow" → 1000 deltas, one every 20 ms (to be cancelled); temperature > 1 → 400.

It records every request body (`requests`) and how many streams the client closed early
(`closed_early`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from llmesh.worker.sse import encode_event
from tests.worker.http_double import DoubleRequest, HttpDouble, Reply


class AnthropicWireDouble(HttpDouble):
    """See module docstring."""

    def __init__(self, api_key: str = "double-key", reply_words: int = 5) -> None:
        super().__init__(self._handle)
        self.api_key = api_key
        self.reply_words = reply_words
        self.requests: list[dict[str, Any]] = []
        self.closed_early = 0

    async def _handle(self, req: DoubleRequest, reply: Reply) -> None:
        if req.method != "POST" or req.path != "/v1/messages":
            await reply.send(404, _error("not_found_error", f"no route {req.method} {req.path}"))
            return
        # SDK 1.x sends the key as x-api-key, SDK 2.x as a bearer token; Anthropic takes both.
        keys = {req.headers.get("x-api-key"), req.headers.get("authorization", "").removeprefix("Bearer ")}
        if self.api_key not in keys:
            await reply.send(401, _error("authentication_error", "invalid x-api-key"))
            return
        if "anthropic-version" not in req.headers:
            await reply.send(400, _error("invalid_request_error", "anthropic-version header is required"))
            return
        body = req.json()
        self.requests.append(body)
        model = body.get("model", "")
        if model == "missing":
            await reply.send(404, _error("not_found_error", f"model: {model}"))
        elif model == "busy":
            await reply.send(429, _error("rate_limit_error", "rate limited"), {"retry-after": "7"})
        elif model == "broken":
            await reply.send(500, _error("api_error", "internal error"))
        elif body.get("temperature", 0) > 1:
            await reply.send(400, _error("invalid_request_error", "temperature: must be at most 1"))
        elif not body.get("stream"):
            await reply.send(400, _error("invalid_request_error", "this double only streams"))
        else:
            await self._stream(body, reply)

    async def _stream(self, body: dict[str, Any], reply: Reply) -> None:
        model = body["model"]
        words = 1000 if model == "slow" else self.reply_words
        interval = 0.02 if model == "slow" else 0.0
        input_tokens = _count_words(body)
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_double",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                    },
                },
            ),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
        ]
        await reply.stream()
        for name, data in events:
            await reply.write(encode_event(data, name))
        stop_reason, stop_sequence, produced = "end_turn", None, 0
        for i in range(words):
            word = f" w{i}"
            hit = next((s for s in body.get("stop_sequences", ()) if s in word), None)
            if hit is not None:
                stop_reason, stop_sequence = "stop_sequence", hit
                break
            if produced == body["max_tokens"]:
                stop_reason = "max_tokens"
                break
            if model == "overloaded-midstream" and produced == 2:
                error = _error("overloaded_error", "Overloaded")
                await reply.write(encode_event(error, "error"))
                return
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
            if not await reply.write(encode_event(delta, "content_block_delta")):
                self.closed_early += 1
                return
            produced += 1
            await asyncio.sleep(interval)
        tail = [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": {"output_tokens": produced},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        for name, data in tail:
            await reply.write(encode_event(data, name))


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _count_words(body: dict[str, Any]) -> int:
    system = body.get("system", "")
    texts = [system if isinstance(system, str) else ""]
    texts += [m["content"] for m in body.get("messages", ()) if isinstance(m.get("content"), str)]
    return sum(len(t.split()) for t in texts)
