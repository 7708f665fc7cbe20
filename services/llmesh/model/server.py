"""Gateway process: ModelService, with channels to the registry, the scheduler and workers."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from llmesh.common.channels import insecure_channel
from llmesh.common.config import LlmeshConfig
from llmesh.common.server import RunningServer, serve_until_signal, start_server, write_ready_file
from llmesh.model.catalog import ModelCatalog
from llmesh.model.dispatch import Dispatcher, WorkerChannels
from llmesh.model.servicer import ModelServicer
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelServiceConfig:
    """What the gateway needs: where to listen and whom to call."""

    listen: str
    registry_address: str
    scheduler_address: str
    max_attempts: int = 3
    catalog_cache_seconds: float = 5.0
    max_message_bytes: int = 10 * 1024 * 1024
    shutdown_grace_seconds: float = 10.0

    @classmethod
    def from_config(cls, cfg: LlmeshConfig, *, listen: str) -> ModelServiceConfig:
        return cls(
            listen=listen,
            registry_address=cfg.address_of("registry"),
            scheduler_address=cfg.address_of("scheduler"),
            max_attempts=cfg.gateway.max_attempts,
            max_message_bytes=cfg.server.max_request_bytes,
            shutdown_grace_seconds=cfg.server.shutdown_grace_seconds,
        )


async def start_model_service(config: ModelServiceConfig) -> RunningServer:
    """Start the gateway; health turns SERVING once the registry and scheduler are reachable."""
    registry_channel = insecure_channel(config.registry_address)
    scheduler_channel = insecure_channel(config.scheduler_address)
    workers = WorkerChannels()
    servicer = ModelServicer(
        ModelCatalog(registry_grpc.RegistryServiceStub(registry_channel), config.catalog_cache_seconds),
        Dispatcher(sched_grpc.SchedulerServiceStub(scheduler_channel), workers, config.max_attempts),
    )

    def add(server: aio.Server) -> list[str]:
        pb_grpc.add_ModelServiceServicer_to_server(servicer, server)
        return [pb.DESCRIPTOR.services_by_name["ModelService"].full_name]

    running = await start_server("gateway", config.listen, add, max_message_bytes=config.max_message_bytes)

    async def become_ready() -> None:
        await asyncio.gather(registry_channel.channel_ready(), scheduler_channel.channel_ready())
        await running.set_serving(True)
        log.info("gateway ready")

    ready_task = asyncio.create_task(become_ready())

    async def close() -> None:
        ready_task.cancel()
        await workers.close()
        await registry_channel.close(None)
        await scheduler_channel.close(None)

    running.after_stop.append(close)
    return running


async def serve_model_service(config: ModelServiceConfig, ready_file: Path | None = None) -> None:
    """Run until SIGTERM/SIGINT."""
    running = await start_model_service(config)
    write_ready_file(ready_file, port=running.port)
    await serve_until_signal(running, config.shutdown_grace_seconds)
