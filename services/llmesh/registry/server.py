"""RegistryService bootstrap: migrations, config models and the models file, the last known
membership, eviction and write-behind loops, the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from llmesh.auth.v1 import auth_service_pb2
from llmesh.common.config import ConfigError, LlmeshConfig, ModelConfig
from llmesh.common.errors import InvalidRequest
from llmesh.common.metrics import serve_metrics
from llmesh.common.server import RunningServer, serve_until_signal, start_server, write_ready_file
from llmesh.model.v1 import model_service_pb2_grpc as model_grpc
from llmesh.registry.catalog import Catalog, check_config_models
from llmesh.registry.catalog_writes import parse_models_yaml
from llmesh.registry.model_catalog import SERVICE_NAME as MODEL_SERVICE_NAME
from llmesh.registry.model_catalog import ModelCatalogServicer
from llmesh.registry.servicer import RegistryServicer
from llmesh.registry.supervisor_client import SupervisorClient
from llmesh.registry.traffic import TrafficFeed
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.registry.worker_store import MembershipWriter, WorkerStore
from llmesh.registry.workers import WorkerTable
from llmesh.scheduler.v1 import scheduler_service_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
# The other public services behind the edge, whose reflection Envoy routes to the registry.
EDGE_REFLECTED_SERVICES = (
    auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    scheduler_service_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
)


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
    # A models YAML upserted at every start-up (after the config's models).
    models_file: Path | None = None
    # Seconds between write-behinds of membership changes.
    persist_interval_seconds: float = 0.5
    # Where this process serves Prometheus `/metrics` ("host:port", port 0: any); "": nowhere.
    metrics_listen: str = ""
    # SupervisorService that starts/stops worker processes (`llmesh up`'s); "": none attached.
    supervisor_address: str = ""

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
    def from_config(
        cls, cfg: LlmeshConfig, *, listen: str, database_url: str, models_file: Path | None = None
    ) -> RegistryServiceConfig:
        """Take the registry's settings from the platform config; arguments win over the file's."""
        configured = cfg.registry.models_file
        return cls(
            models_file=models_file or (Path(configured) if configured else None),
            listen=listen,
            database_url=database_url or cfg.database.url,
            heartbeat_ttl_seconds=float(cfg.registry.heartbeat_ttl_seconds),
            heartbeat_interval_seconds=float(cfg.registry.heartbeat_interval_seconds),
            models=cfg.models,
            max_message_bytes=cfg.server.max_request_bytes,
            shutdown_grace_seconds=cfg.server.shutdown_grace_seconds,
            supervisor_address=cfg.registry.supervisor_address,
        )


async def _evict_loop(workers: WorkerTable, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        workers.evict_expired()


def _read_models_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ConfigError(f"models file {path}: cannot read it ({e.strerror})") from None


async def _prepare_catalog(
    config: RegistryServiceConfig, catalog: Catalog, store: WorkerStore
) -> list[tuple[registry_pb2.Worker, int]]:
    """Migrate, upsert the config's models and the models file, load the last membership."""
    await asyncio.to_thread(catalog.migrate)
    await asyncio.to_thread(catalog.upsert_config_models, config.models)
    if config.models_file is not None:
        text = _read_models_file(config.models_file)
        try:
            specs = await asyncio.to_thread(parse_models_yaml, text)
            result = await asyncio.to_thread(
                catalog.import_specs, specs, replace=False, actor="models-file", where="models"
            )
        except InvalidRequest as e:
            raise ConfigError(f"models file {config.models_file}: {e.message}") from None
        log.info(
            "models file upserted",
            extra={
                "path": str(config.models_file),
                "models_created": result.created,
                "models_updated": result.updated,
            },
        )
    # Read the names once, so workers can register from this view even if the database goes down.
    await asyncio.to_thread(catalog.known_names)
    return await asyncio.to_thread(store.load)


async def start_registry(config: RegistryServiceConfig) -> RunningServer:
    """Prepare the catalog, start the server, then report SERVING.

    The database is migrated before the port opens, so no RPC ever sees a half-ready catalog; an
    unreachable database fails start-up with UNAVAILABLE-style `DependencyDown` naming the URL.
    Membership starts from the last persisted view (each worker with a fresh TTL), so schedulers
    that re-watch after a restart keep their pools.
    """
    catalog = Catalog.from_url(config.database_url)
    store = WorkerStore(catalog.engine)
    try:
        saved = await _prepare_catalog(config, catalog, store)
        traffic = TrafficFeed(await asyncio.to_thread(catalog.traffic_splits))
    except BaseException:
        catalog.dispose()
        raise
    workers = WorkerTable(
        config.heartbeat_ttl_seconds, conflict_window_s=2 * config.heartbeat_interval_seconds
    )
    workers.restore(saved)
    writer = MembershipWriter(workers, store)
    supervisor = SupervisorClient(config.supervisor_address) if config.supervisor_address else None
    servicer = RegistryServicer(
        catalog,
        workers,
        ttl_s=config.heartbeat_ttl_seconds,
        heartbeat_interval_s=config.heartbeat_interval_seconds,
        traffic=traffic,
        persist=writer.flush,
        supervisor=supervisor,
    )

    def add(server: aio.Server) -> list[str]:
        registry_grpc.add_RegistryServiceServicer_to_server(servicer, server)
        # ModelService's catalog reads live here too (the workers serve its inference RPCs).
        model_grpc.add_ModelServiceServicer_to_server(ModelCatalogServicer(servicer), server)
        return [SERVICE_NAME, MODEL_SERVICE_NAME]

    try:
        running = await start_server(
            "registry",
            config.listen,
            add,
            max_message_bytes=config.max_message_bytes,
            # Envoy sends every client's reflection here: describe the whole public API it serves,
            # so grpcurl through the edge can call AuthService and SchedulerService by name too.
            reflect_also=EDGE_REFLECTED_SERVICES,
        )
    except BaseException:
        catalog.dispose()
        raise
    # Sweep often enough that eviction lags the TTL by at most a quarter of it.
    evictor = asyncio.create_task(
        _evict_loop(workers, min(1.0, config.heartbeat_ttl_seconds / 4)), name="registry-evictor"
    )
    persister = asyncio.create_task(
        writer.run(config.persist_interval_seconds), name="registry-membership-writer"
    )

    async def shutdown() -> None:
        for task in (evictor, persister):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Ends watch streams now, so schedulers reconnect instead of waiting out the grace period.
        workers.close_watchers()
        traffic.close()

    async def close_catalog() -> None:
        await writer.flush()
        await asyncio.to_thread(catalog.dispose)
        if supervisor is not None:
            await supervisor.close()

    running.on_shutdown.append(shutdown)
    running.after_stop.append(close_catalog)
    await running.set_serving(True)
    log.info("registry ready", extra={"port": running.port, "database": catalog.url})
    return running


async def serve_registry(config: RegistryServiceConfig, ready_file: Path | None = None) -> None:
    """Run the registry until SIGTERM/SIGINT; `ready_file` gets {"port": N} once it serves."""
    metrics = serve_metrics(config.metrics_listen)
    running = await start_registry(config)
    write_ready_file(ready_file, port=running.port, **metrics)
    await serve_until_signal(running, config.shutdown_grace_seconds)
