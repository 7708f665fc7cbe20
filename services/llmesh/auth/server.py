"""AuthService process. Its RPCs land in the auth issue; until then every one answers
UNIMPLEMENTED honestly (the generated base servicer), and the gateway runs with auth disabled."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from llmesh.auth.v1 import auth_service_pb2 as pb
from llmesh.auth.v1 import auth_service_pb2_grpc as pb_grpc
from llmesh.common.config import LlmeshConfig
from llmesh.common.server import RunningServer, serve_until_signal, start_server, write_ready_file


@dataclass(frozen=True)
class AuthServiceConfig:
    """Where AuthService listens."""

    listen: str
    max_message_bytes: int = 10 * 1024 * 1024
    shutdown_grace_seconds: float = 10.0

    @classmethod
    def from_config(cls, cfg: LlmeshConfig, *, listen: str) -> AuthServiceConfig:
        return cls(
            listen=listen,
            max_message_bytes=cfg.server.max_request_bytes,
            shutdown_grace_seconds=cfg.server.shutdown_grace_seconds,
        )


async def start_auth(config: AuthServiceConfig) -> RunningServer:
    """Start AuthService (all RPCs UNIMPLEMENTED for now) and report SERVING."""

    def add(server: aio.Server) -> list[str]:
        pb_grpc.add_AuthServiceServicer_to_server(pb_grpc.AuthServiceServicer(), server)
        return [pb.DESCRIPTOR.services_by_name["AuthService"].full_name]

    running = await start_server("auth", config.listen, add, max_message_bytes=config.max_message_bytes)
    await running.set_serving(True)
    return running


async def serve_auth(config: AuthServiceConfig, ready_file: Path | None = None) -> None:
    """Run until SIGTERM/SIGINT."""
    running = await start_auth(config)
    write_ready_file(ready_file, port=running.port)
    await serve_until_signal(running, config.shutdown_grace_seconds)
