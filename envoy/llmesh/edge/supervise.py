"""Envoy as one more child of `llmesh up`'s Stack: started last, stopped first, logs beside the rest.

Synchronous, like the Stack it joins. Upstream addresses are the ones the Stack handed its
children (`LLMESH_ENDPOINTS__*`), so services that bound port 0 are found too.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from llmesh.edge.bootstrap import render_yaml
from llmesh.edge.descriptor import default_descriptor_path
from llmesh.edge.process import EnvoyStartError, client_host, envoy_argv, listener_port
from llmesh.edge.settings import EdgeSettings
from llmesh.edge.validate import find_envoy

if TYPE_CHECKING:
    from llmesh.cli.stack import Stack
    from llmesh.common.config import LlmeshConfig

STARTUP_TIMEOUT_S = 30.0


def stack_settings(stack: Stack, cfg: LlmeshConfig, descriptor_path: Path | None = None) -> EdgeSettings:
    """EdgeSettings for the services `stack` started: their actual addresses override `cfg`'s."""
    settings = EdgeSettings.from_config(cfg, (descriptor_path or default_descriptor_path()).resolve())

    def address(name: str) -> str:
        return stack.env.get(f"LLMESH_ENDPOINTS__{name.upper()}") or str(getattr(settings, name))

    return dataclasses.replace(
        settings,
        registry=address("registry"),
        auth=address("auth"),
        scheduler=address("scheduler"),
    )


def start_envoy_child(
    stack: Stack,
    cfg: LlmeshConfig,
    *,
    descriptor_path: Path | None = None,
    envoy_bin: Path | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> str:
    """Start Envoy in front of `stack`'s services; return "host:port" of the edge once it serves.

    The config goes to run/envoy.yaml, Envoy's log and its access log (stdout) to logs/envoy.log.
    Raises llmesh.cli.stack.StackError (with the log's tail) when Envoy does not come up.
    """
    from llmesh.cli.stack import Child, StackError, log_tail

    settings = stack_settings(stack, cfg, descriptor_path)
    run = stack.run_dir / "run"
    config_path = run / "envoy.yaml"
    config_path.write_text(render_yaml(settings), encoding="utf-8")
    admin_address_path = run / "envoy.admin-address"
    admin_address_path.unlink(missing_ok=True)
    ready_file = run / "envoy.ready.json"
    ready_file.unlink(missing_ok=True)
    log_file = stack.run_dir / "logs" / "envoy.log"
    argv = envoy_argv(
        envoy_bin or find_envoy(),
        config_path,
        admin_address_path=admin_address_path,
        log_path=None,
        concurrency=settings.worker_thread_count(),
    )
    with log_file.open("ab") as log:
        # The stack's session, like every child (Stack.spawn): nice values only rank within one.
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0
        )
    child = Child(name="envoy", kind="envoy", process=process, ready_file=ready_file, log_file=log_file)
    stack.children.append(child)
    try:
        port, admin_port = _wait_ready(process, settings, admin_address_path, timeout_s)
    except EnvoyStartError as error:
        raise StackError(f"envoy did not start: {error}; log {log_file}:\n{log_tail(log_file)}") from None
    child.info = {"port": port, "admin_port": admin_port, "config": str(config_path)}
    ready_file.write_text(json.dumps(child.info))
    return f"{client_host(settings.listen_host)}:{port}"


def _wait_ready(
    process: subprocess.Popen[bytes], settings: EdgeSettings, admin_address_path: Path, timeout_s: float
) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    admin_host = client_host(settings.admin_host)
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise EnvoyStartError(f"envoy exited with status {code}")
        admin_port = _admin_port(settings, admin_address_path)
        if admin_port and _get(f"http://{admin_host}:{admin_port}/ready") == b"LIVE":
            port = settings.listen_port
            if port == 0:
                body = _get(f"http://{admin_host}:{admin_port}/listeners?format=json")
                port = listener_port(body or b"{}")
            if _accepts(client_host(settings.listen_host), port):
                return port, admin_port
        time.sleep(0.05)
    raise EnvoyStartError(f"not ready within {timeout_s:.0f}s")


def _admin_port(settings: EdgeSettings, admin_address_path: Path) -> int:
    if settings.admin_port:
        return settings.admin_port
    try:
        text = admin_address_path.read_text().strip()
    except FileNotFoundError:
        return 0
    return int(text.rpartition(":")[2]) if text else 0


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bytes(response.read()).strip()
    except (urllib.error.URLError, OSError):
        return None


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
