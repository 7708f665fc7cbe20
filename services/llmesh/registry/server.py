"""RegistryService bootstrap: catalog schema and config models, membership eviction, the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from llmesh.common.config import ConfigError, LlmeshConfig, ModelConfig
from llmesh.common.server import RunningServer, serve_until_signal, start_server, write_ready_file
from llmesh.model.v1 import model_service_pb2_grpc as model_grpc
from llmesh.registry.catalog import Catalog, check_config_models
from llmesh.registry.model_catalog import SERVICE_NAME as MODEL_SERVICE_NAME
from llmesh.registry.model_catalog import ModelCatalogServicer
from llmesh.registry.servicer import RegistryServicer
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.registry.workers import WorkerTable

log = logging.getLogger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


@dataclass(frozen=True)
class RegistryServiceConfig:
    """Everything the registry process needs, resolved by the caller (no paths picked here)."""

    listen: str
    database_url: str
    heartbeat_ttl_seconds: float = 10.0
    heartbeat_interval_seconds: float = 2.0
    models: tuple[ModelConfig, ...] = ()
    max_message_bytes: int = 10 * 1024 * 1024
    shutdown_grace_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ConfigError(
                "registry: database_url is empty; pass the resolved URL (llmesh up uses "
                "sqlite:///DATA_DIR/llmesh.db when database.url is unset)"
            )
        if self.heartbeat_ttl_seconds <= 0 or self.heartbeat_interval_seconds <= 0:
            raise ConfigError("registry: heartbeat_ttl_seconds and heartbeat_interval_seconds must be > 0")
        if self.heartbeat_interval_seconds >= self.heartbeat_ttl_seconds:
            raise ConfigError(
                f"registry: heartbeat_interval_seconds ({self.heartbeat_interval_seconds}) must be below "
                f"heartbeat_ttl_seconds ({self.heartbeat_ttl_seconds}), or live workers get evicted"
            )
        check_config_models(self.models)

    @classmethod
    def from_config(cls, cfg: LlmeshConfig, *, listen: str, database_url: str) -> RegistryServiceConfig:
        """Take the registry's settings from the platform config; `database_url` wins over the file's."""
        return cls(
            listen=listen,
            database_url=database_url or cfg.database.url,
            heartbeat_ttl_seconds=float(cfg.registry.heartbeat_ttl_seconds),
            heartbeat_interval_seconds=float(cfg.registry.heartbeat_interval_seconds),
            models=cfg.models,
            max_message_bytes=cfg.server.max_request_bytes,
            shutdown_grace_seconds=cfg.server.shutdown_grace_seconds,
        )


async def _evict_loop(workers: WorkerTable, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        workers.evict_expired()


async def start_registry(config: RegistryServiceConfig) -> RunningServer:
    """Prepare the catalog, start the server, then report SERVING.

    The database is set up before the port opens, so no RPC ever sees a half-ready catalog; an
    unreachable database fails start-up with UNAVAILABLE-style `DependencyDown` naming the URL.
    """
    catalog = Catalog.from_url(config.database_url)
    try:
        await asyncio.to_thread(catalog.create_schema)
        await asyncio.to_thread(catalog.upsert_config_models, config.models)
    except BaseException:
        catalog.dispose()
        raise
    workers = WorkerTable(config.heartbeat_ttl_seconds)
    servicer = RegistryServicer(
        catalog,
        workers,
        ttl_s=config.heartbeat_ttl_seconds,
        heartbeat_interval_s=config.heartbeat_interval_seconds,
    )

    def add(server: aio.Server) -> list[str]:
        registry_grpc.add_RegistryServiceServicer_to_server(servicer, server)
        # ModelService's catalog reads live here too (the workers serve its inference RPCs).
        model_grpc.add_ModelServiceServicer_to_server(ModelCatalogServicer(servicer), server)
        return [SERVICE_NAME, MODEL_SERVICE_NAME]

    try:
        running = await start_server(
            "registry", config.listen, add, max_message_bytes=config.max_message_bytes
        )
    except BaseException:
        catalog.dispose()
        raise
    # Sweep often enough that eviction lags the TTL by at most a quarter of it.
    evictor = asyncio.create_task(
        _evict_loop(workers, min(1.0, config.heartbeat_ttl_seconds / 4)), name="registry-evictor"
    )

    async def shutdown() -> None:
        evictor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await evictor
        # Ends watch streams now, so schedulers reconnect instead of waiting out the grace period.
        workers.close_watchers()

    async def close_catalog() -> None:
        await asyncio.to_thread(catalog.dispose)

    running.on_shutdown.append(shutdown)
    running.after_stop.append(close_catalog)
    await running.set_serving(True)
    log.info("registry ready", extra={"port": running.port, "database": catalog.url})
    return running


async def serve_registry(config: RegistryServiceConfig, ready_file: Path | None = None) -> None:
    """Run the registry until SIGTERM/SIGINT; `ready_file` gets {"port": N} once it serves."""
    running = await start_registry(config)
    write_ready_file(ready_file, port=running.port)
    await serve_until_signal(running, config.shutdown_grace_seconds)
