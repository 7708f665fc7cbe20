"""When each server-sent event of a response reached this machine's TCP stack, not the test process.

A busy 2-core machine can leave a test process unscheduled for hundreds of milliseconds; a client
reading after such a pause sees every frame that arrived meanwhile "at once" and would blame the
server for a burst. The kernel stamps each received segment (SO_TIMESTAMPNS); reading in small
pieces returns the stamp of the segment each piece came from, so frame arrival times are those of
the wire, whatever the reader's own scheduling.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass

_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@ll")
_READ = 64  # small reads: each returns the stamp of the segment it read from


@dataclass(frozen=True)
class Frame:
    """One SSE frame (`data: ...`) and the kernel's receive time of its last byte (seconds)."""

    at: float
    data: str


def _recv_stamped(sock: socket.socket) -> tuple[bytes, float]:
    data, ancillary, _, _ = sock.recvmsg(_READ, socket.CMSG_SPACE(_TIMESPEC.size))
    if not data:
        return data, 0.0  # end of stream: nothing was received, nothing is stamped
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
            seconds, nanos = _TIMESPEC.unpack(payload[: _TIMESPEC.size])
            return data, seconds + nanos / 1e9
    raise RuntimeError("the kernel gave no receive timestamp (SO_TIMESTAMPNS unsupported?)")


def post_sse(
    host: str, port: int, path: str, body: dict[str, object], timeout_s: float = 120.0
) -> list[Frame]:
    """POST `body` as JSON over HTTP/1.1 and return the response's SSE frames with wire times.

    Raises AssertionError unless the answer is 200 with chunked text/event-stream."""
    payload = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    stamped: list[tuple[int, float]] = []  # (end offset of a read, its stamp)
    raw = bytearray()
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.sendall(request)
        while True:
            data, at = _recv_stamped(sock)
            if not data:
                break
            raw += data
            stamped.append((len(raw), at))
    head_end = raw.index(b"\r\n\r\n") + 4
    head = raw[:head_end].decode("latin-1").lower()
    assert head.startswith("http/1.1 200"), head
    assert "transfer-encoding: chunked" in head and "text/event-stream" in head, head
    # De-chunk, remembering for each body byte where it sat in `raw`.
    body_bytes = bytearray()
    origin: list[int] = []
    i = head_end
    while True:
        line_end = raw.index(b"\r\n", i)
        size = int(raw[i:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0:
            break
        body_bytes += raw[start : start + size]
        origin.extend(range(start, start + size))
        i = start + size + 2

    def stamp_of(raw_offset: int) -> float:
        for end, at in stamped:
            if raw_offset < end:
                return at
        return stamped[-1][1]

    frames = []
    cursor = 0
    while True:
        end = body_bytes.find(b"\n\n", cursor)
        if end < 0:
            break
        frames.append(Frame(stamp_of(origin[end + 1]), body_bytes[cursor:end].decode()))
        cursor = end + 2
    return frames
