"""`llmesh up`'s Envoy: a Stack child in front of the addresses the Stack handed out."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from llmesh.cli.stack import Stack, StackError
from llmesh.common.config import LlmeshConfig, ServerConfig
from llmesh.edge.supervise import start_envoy_child
from tests.edge.edge_standins import StandIn, wait_until

pytestmark = pytest.mark.envoy


def stack_config() -> LlmeshConfig:
    return LlmeshConfig(server=ServerConfig(envoy_port=0, envoy_admin_port=0, envoy_worker_threads=3))


async def test_envoy_joins_the_stack_and_stops_with_it(
    standins: dict[str, StandIn], envoy_bin: Path, tmp_path: Path
) -> None:
    stack = Stack(tmp_path, None, env={})
    for name, standin in standins.items():
        stack.set_endpoint(name, standin.address)
    try:
        # Off the event loop: the stand-ins on it must answer Envoy's first health checks.
        address = await asyncio.to_thread(start_envoy_child, stack, stack_config(), envoy_bin=envoy_bin)
        (child,) = stack.children
        assert child.name == "envoy" and address == f"127.0.0.1:{child.port}"
        assert json.loads(child.ready_file.read_text())["port"] == child.port

        async def serves() -> bool:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.get(f"http://{address}/v1/models")
            return response.status_code == 200 and response.json()["data"][0]["id"] == "tiny"

        await wait_until(serves, timeout_s=15)
        # It runs with the configured worker threads (Envoy's --concurrency).
        async with httpx.AsyncClient(timeout=10) as client:
            info = (await client.get(f"http://127.0.0.1:{child.info['admin_port']}/server_info")).json()
        assert info["command_line_options"]["concurrency"] == 3
        # Its access log (stdout) lands in the stack's logs.
        await wait_until(lambda: _contains(stack.run_dir / "logs" / "envoy.log", '"path":"/v1/models"'))
    finally:
        await asyncio.to_thread(stack.stop_all)
    assert child.process.returncode is not None


async def test_a_broken_envoy_is_a_stack_error(envoy_bin: Path, tmp_path: Path) -> None:
    stack = Stack(tmp_path, None, env={})
    with pytest.raises(StackError, match="envoy"):
        await asyncio.to_thread(
            start_envoy_child,
            stack,
            stack_config(),
            descriptor_path=tmp_path / "missing.pb",
            envoy_bin=envoy_bin,
        )
    await asyncio.to_thread(stack.stop_all)


async def _contains(path: Path, text: str) -> bool:
    try:
        return text in await asyncio.to_thread(path.read_text)
    except FileNotFoundError:
        return False
