"""OpenAIWireDouble: a TEST DOUBLE of an OpenAI-compatible server, for the failures a real server
will not produce on demand (429, 503, a stream that breaks, a server that stops answering).

The real-server tests run against vLLM's OpenAI server; this double only plays faults. Each request
takes the next step of `script` (the last step repeats):

- an int: that HTTP status with an OpenAI-style error body (429 also sends `Retry-After: 3`);
- "ok": a chat stream of the words "a", " b", " c" with usage, then [DONE];
- "no-usage": the same without the usage event (what servers that ignore include_usage send);
- "break": two deltas, then the connection closes mid-stream;
- "hang": the response head, then silence (the client's read timeout fires).

`requests` holds every request body received.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llmesh.worker.sse import encode_event
from tests.worker.http_double import DoubleRequest, HttpDouble, Reply


class OpenAIWireDouble(HttpDouble):
    """See module docstring. Its base URL (`url`) ends in /v1, as OpenAI-compatible servers' do."""

    def __init__(self, *script: int | str) -> None:
        super().__init__(self._handle)
        self.script: list[int | str] = list(script) or ["ok"]
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, req: DoubleRequest, reply: Reply) -> None:
        self.requests.append(req.json())
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if isinstance(step, int):
            headers = {"Retry-After": "3"} if step == 429 else {}
            body = {"error": {"message": f"scripted {step}", "type": "double", "code": step}}
            await reply.send(step, body, headers)
            return
        await reply.stream()
        if step == "hang":
            await reply.disconnected.wait()
            return
        words = ["a", " b", " c"]
        for i, word in enumerate(words):
            if step == "break" and i == 2:
                return  # the connection closes with the stream unfinished
            last = i == len(words) - 1
            choice = {"index": 0, "delta": {"content": word}, "finish_reason": "stop" if last else None}
            await reply.write(encode_event({"object": "chat.completion.chunk", "choices": [choice]}))
            await asyncio.sleep(0)
        if step == "ok":
            usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
            await reply.write(
                encode_event({"object": "chat.completion.chunk", "choices": [], "usage": usage})
            )
        await reply.write(encode_event("[DONE]"))
