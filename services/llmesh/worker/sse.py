"""Server-sent events (the `text/event-stream` format upstream LLM APIs stream in), both ways.

`read_events` turns a stream of lines into events as the WHATWG spec defines them: `data:` lines
join with newlines, a blank line dispatches, `:` lines are comments. `encode_event` writes one
event, for test doubles that play an upstream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SseEvent:
    """One dispatched event: its type ("message" unless the server named one) and its data."""

    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def read_events(lines: AsyncIterable[str]) -> AsyncIterator[SseEvent]:
    """Events from `lines` (without their line endings), as soon as each is complete."""
    event = ""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield SseEvent(event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        # "id" and "retry" steer browser reconnects; an LLM stream is never resumed.
    if data:  # a server that closes without the final blank line still meant the event
        yield SseEvent(event or "message", "\n".join(data))


def encode_event(data: Any, event: str | None = None) -> bytes:
    """One event on the wire; `data` that is not a string is sent as JSON."""
    text = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    body = "".join(f"data: {line}\n" for line in text.split("\n"))
    return (head + body + "\n").encode()
