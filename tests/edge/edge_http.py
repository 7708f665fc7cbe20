"""HTTP helpers shared by the edge tests."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import Any

import httpx

from llmesh.edge import EdgeSettings, EnvoyProcess
from llmesh.edge.bootstrap import route_table
from llmesh.edge.descriptor import HttpRoute
from tests.edge.edge_standins import StandIn

# gRPC path (or prefix) -> the cluster the edge routes it to.
CLUSTER_OF: dict[str, str] = dict(route_table())


async def request(
    edge: EnvoyProcess,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
        return await client.request(method, path, json=json_body, content=content, headers=headers)


def assert_openai_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert error["type"] == error_type, error
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def concrete(route: HttpRoute) -> str:
    """The route's path template with every {variable} filled in."""
    return re.sub(r"\{[^}]+\}", "x1", route.path)


def calls_of(standins: dict[str, StandIn], request_id: str) -> list[tuple[str, str]]:
    return [(s.name, method) for s in standins.values() for method, rid in s.calls if rid == request_id]


async def run(*argv: str) -> tuple[int, str, str]:
    """A subprocess that does not block the event loop the stand-ins run on."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def edge_settings(
    descriptor: Path, addresses: dict[str, str], access_log: Path | None = None
) -> EdgeSettings:
    """Settings for a test Envoy: kernel-chosen ports, frequent health checks. The checks keep
    the edge's lenient timeout: the stand-ins answer on the tests' event loop, which a loaded
    machine may hold up for a while. Tests whose scheduler is a closed port would wait Envoy's
    whole initial EDS fetch timeout (15 s) before it serves; 2 s leaves a stand-in scheduler time to
    answer on a loaded machine."""
    return EdgeSettings(
        listen_port=0,
        admin_port=0,
        descriptor_path=str(descriptor),
        access_log_path=str(access_log) if access_log else "",
        health_check_interval_s=0.5,
        workers_initial_fetch_timeout_s=2.0,
        **addresses,
    )
