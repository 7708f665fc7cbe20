"""A supervised Envoy: write the rendered config, start it, wait until it serves, stop it.

`llmesh up` and the tests use this. Port 0 for the listener or admin interface is allowed: the
bound ports are read back from Envoy (admin address file, admin `/listeners`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from types import TracebackType

from llmesh.edge.bootstrap import LISTENER_NAME, render_yaml
from llmesh.edge.settings import EdgeSettings
from llmesh.edge.validate import find_envoy

log = logging.getLogger(__name__)


class EnvoyStartError(RuntimeError):
    """Envoy exited or did not become ready in time; the message ends with its log."""


def envoy_argv(
    binary: Path,
    config_path: Path,
    *,
    admin_address_path: Path,
    log_path: Path | None,
    log_level: str = "warn",
    concurrency: int,
) -> list[str]:
    """The Envoy command line llmesh runs its edge with."""
    argv = [
        str(binary),
        "-c",
        str(config_path),
        "--log-level",
        log_level,
        "--concurrency",
        str(concurrency),
        # Several Envoys (tests, two stacks) on one machine must not share hot-restart memory.
        "--use-dynamic-base-id",
        # Where Envoy writes its admin address (the port, when the config asks for port 0).
        "--admin-address-path",
        str(admin_address_path),
        # Access log lines reach their file within a second (Envoy's default is 10 s).
        "--file-flush-interval-msec",
        "1000",
    ]
    if log_path is not None:
        argv += ["--log-path", str(log_path)]
    return argv


def listener_port(listeners_json: bytes) -> int:
    """The bound port of the edge listener, from admin `/listeners?format=json`."""
    for entry in json.loads(listeners_json).get("listener_statuses", []):
        if entry.get("name") == LISTENER_NAME:
            return int(entry["local_address"]["socket_address"]["port_value"])
    raise EnvoyStartError(f"listener {LISTENER_NAME} not found in admin /listeners")


def client_host(host: str) -> str:
    """Where to connect to reach a listener bound to `host` (a wildcard means this machine)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


class EnvoyProcess:
    """One Envoy process serving `settings`, with its files under `run_dir`.

    Use `async with EnvoyProcess(settings, run_dir) as envoy:` or `await start()` / `await stop()`.
    The config is `run_dir/envoy.yaml`, Envoy's own log `run_dir/envoy.log`.
    """

    def __init__(
        self,
        settings: EdgeSettings,
        run_dir: Path,
        *,
        envoy_bin: Path | None = None,
        log_level: str = "warn",
        concurrency: int | None = None,
        startup_timeout_s: float = 30.0,
    ) -> None:
        descriptor = Path(settings.descriptor_path)
        # Envoy resolves a relative descriptor path against its own working directory.
        self.settings = dataclasses.replace(settings, descriptor_path=str(descriptor.resolve()))
        self.run_dir = run_dir
        self.config_path = run_dir / "envoy.yaml"
        self.log_path = run_dir / "envoy.log"
        self._admin_address_path = run_dir / "admin-address.txt"
        self._envoy_bin = envoy_bin
        self._log_level = log_level
        # Worker threads: the settings' count unless the caller names one.
        self._concurrency = concurrency or self.settings.worker_thread_count()
        self._startup_timeout_s = startup_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self.port: int = settings.listen_port
        self.admin_port: int = settings.admin_port

    @property
    def url(self) -> str:
        """Base URL of the edge listener, e.g. http://127.0.0.1:8080."""
        return f"http://{client_host(self.settings.listen_host)}:{self.port}"

    @property
    def grpc_target(self) -> str:
        """host:port for gRPC clients (grpc.aio.insecure_channel, grpcurl -plaintext)."""
        return f"{client_host(self.settings.listen_host)}:{self.port}"

    @property
    def admin_url(self) -> str:
        """Base URL of the admin interface (loopback)."""
        return f"http://{client_host(self.settings.admin_host)}:{self.admin_port}"

    @property
    def pid(self) -> int | None:
        """The Envoy process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.returncode is None

    def render(self) -> str:
        """The bootstrap YAML this Envoy runs with."""
        return render_yaml(self.settings)

    async def start(self) -> None:
        """Write the config, start Envoy and return once the listener accepts connections and
        admin `/ready` says LIVE. Raises EnvoyStartError (with Envoy's log) otherwise."""
        if self._proc is not None:
            raise RuntimeError("this EnvoyProcess was already started")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render(), encoding="utf-8")
        self._admin_address_path.unlink(missing_ok=True)
        args = envoy_argv(
            self._envoy_bin or find_envoy(),
            self.config_path,
            admin_address_path=self._admin_address_path,
            log_path=self.log_path,
            log_level=self._log_level,
            concurrency=self._concurrency,
        )
        stdout = (self.run_dir / "envoy.stdout").open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=asyncio.subprocess.STDOUT
            )
        finally:
            stdout.close()
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        log.info("envoy ready", extra={"pid": self.pid, "port": self.port, "admin_port": self.admin_port})

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if Envoy has not exited within `timeout_s`. Safe to call twice."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def wait(self) -> int:
        """Wait for Envoy to exit; its exit status."""
        if self._proc is None:
            raise RuntimeError("envoy was not started")
        return await self._proc.wait()

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of Envoy's log and stdout, for error messages."""
        parts = []
        for path in (self.log_path, self.run_dir / "envoy.stdout"):
            if path.exists():
                text = path.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    parts.append(f"--- {path.name}\n{text[-max_chars:]}")
        return "\n".join(parts)

    async def __aenter__(self) -> EnvoyProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ readiness

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while True:
            self._check_alive()
            if time.monotonic() > deadline:
                raise EnvoyStartError(
                    f"envoy did not become ready within {self._startup_timeout_s:.0f}s\n{self.log_tail()}"
                )
            if await self._ready_once():
                return
            await asyncio.sleep(0.05)

    async def _ready_once(self) -> bool:
        if self.settings.admin_port == 0:
            if not self._admin_address_path.exists():
                return False
            text = self._admin_address_path.read_text().strip()
            if not text:
                return False
            self.admin_port = int(text.rpartition(":")[2])
        try:
            status, body = await _http_get(client_host(self.settings.admin_host), self.admin_port, "/ready")
        except OSError:
            return False
        if status != 200 or body.strip() != b"LIVE":
            return False
        if self.settings.listen_port == 0:
            self.port = await self._bound_listener_port()
        return await _accepts(client_host(self.settings.listen_host), self.port)

    async def _bound_listener_port(self) -> int:
        status, body = await _http_get(
            client_host(self.settings.admin_host), self.admin_port, "/listeners?format=json"
        )
        if status != 200:
            raise EnvoyStartError(f"admin /listeners answered {status}")
        return listener_port(body)

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.returncode is not None:
            raise EnvoyStartError(f"envoy exited with status {self._proc.returncode}\n{self.log_tail()}")


async def _http_get(host: str, port: int, path: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET (the edge extra does not depend on an HTTP client library; Envoy
    refuses HTTP/1.0 with 426)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status_line = lines[0].split()
    status = int(status_line[1]) if len(status_line) >= 2 and status_line[1].isdigit() else 0
    if any(line.lower().replace(b" ", b"") == b"transfer-encoding:chunked" for line in lines[1:]):
        body = _dechunk(body)
    return status, body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
