"""Real registry processes (for kill -9) and a TCP proxy that can cut a database off, for fault tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RegistryProcess:
    """`llmesh serve registry` as a child process on a fixed port (so a restart keeps the address)."""

    workdir: Path
    database_url: str
    port: int = field(default_factory=free_port)
    ttl: int = 3
    interval: int = 1
    models: tuple[dict[str, object], ...] = ({"name": "tiny-llama", "aliases": ["tiny"]},)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        """Start and wait until it serves (its ready file appears)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "llmesh.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "logging": {"level": "INFO", "json": True},
                    "registry": {
                        "heartbeat_interval_seconds": self.interval,
                        "heartbeat_ttl_seconds": self.ttl,
                    },
                    "models": list(self.models),
                }
            )
        )
        ready = self.workdir / f"ready-{self.starts}.json"
        self.starts += 1
        log = (self.workdir / "registry.log").open("ab")
        env = {**os.environ, "LLMESH_DATABASE__URL": self.database_url}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmesh.cli.main",
                "--config",
                str(config),
                "serve",
                "registry",
                "--listen",
                self.address,
                "--data-dir",
                str(self.workdir),
                "--ready-file",
                str(ready),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"registry exited with {self.proc.returncode}; see {self.workdir}/registry.log"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"registry not ready in {timeout}s; see {self.workdir}/registry.log")
            time.sleep(0.05)
        assert json.loads(ready.read_text())["port"] == self.port

    def kill(self) -> None:
        """kill -9: no shutdown hooks, no final flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM, then wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class TcpProxy:
    """Forwards 127.0.0.1:port to a database server; `cut()` drops every connection and refuses new
    ones (the database "goes down" for whoever dials the proxy), `restore()` brings it back."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._conns.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns.difference_update((writer, up_writer))

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._conns):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._conns.clear()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def restore(self) -> None:
        """Accept connections again on the same port."""
        await self.start()

    async def close(self) -> None:
        await self.cut()
