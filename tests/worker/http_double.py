"""A minimal HTTP/1.1 server on asyncio streams, the base of the upstream TEST DOUBLES.

Each connection carries one request (`Connection: close`); a handler answers with `send` (a whole
response) or `stream` + `write` (a body written piece by piece, ending when the connection closes).
`disconnected` is set when the client goes away, so a double can tell a cancelled stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Self


@dataclass
class DoubleRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class Reply:
    writer: asyncio.StreamWriter
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
        await self._head(status, head)
        self.writer.write(data)
        await self.writer.drain()

    async def stream(self, status: int = 200, content_type: str = "text/event-stream") -> None:
        await self._head(status, {"Content-Type": content_type, "Cache-Control": "no-cache"})

    async def write(self, data: bytes) -> bool:
        """Write a piece of the body; False once the client has gone."""
        if self.disconnected.is_set():
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            self.disconnected.set()
            return False
        return True

    async def _head(self, status: int, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} Double", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close"]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()


Handler = Callable[[DoubleRequest, Reply], Awaitable[None]]


class HttpDouble:
    """Serves `handler` on 127.0.0.1 at a free port."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await _read_request(reader)
            reply = Reply(writer)
            watcher = asyncio.create_task(_watch_eof(reader, reply.disconnected))
            try:
                await self._handler(request, reply)
            finally:
                watcher.cancel()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> DoubleRequest:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    method, path, _ = head[0].split(" ", 2)
    headers = {}
    for line in head[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return DoubleRequest(method, path, headers, body)


async def _watch_eof(reader: asyncio.StreamReader, gone: asyncio.Event) -> None:
    with contextlib.suppress(ConnectionError):
        await reader.read()  # the client sends nothing more; EOF means it closed the connection
    gone.set()
