"""SchedulerService bootstrap: the pool, the registry watch that feeds it, lease reclaiming, and the
server with the SchedulerService RPCs, Envoy's endpoint picker (ext_proc) and the workers' EDS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from envoy.service.endpoint.v3 import eds_pb2_grpc as eds_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc import aio

from llmesh.common.channels import service_channel
from llmesh.common.config import ConfigError, LlmeshConfig
from llmesh.common.metrics import serve_metrics
from llmesh.common.server import RunningServer, serve_until_signal, start_server, write_ready_file
from llmesh.registry.traffic_watch import TrafficWatch
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.scheduler import metrics
from llmesh.scheduler.catalog import ModelCatalog
from llmesh.scheduler.endpoints import EndpointDiscovery, WorkerEndpoints
from llmesh.scheduler.picker import EndpointPicker
from llmesh.scheduler.pool import WorkerPool
from llmesh.scheduler.registry_watch import RegistryWatch
from llmesh.scheduler.servicer import SchedulerServicer
from llmesh.scheduler.traffic import TrafficSummary
from llmesh.scheduler.usage import AuthUsageSink, LogUsageSink
from llmesh.scheduler.usage_desk import UsageDesk
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
EXT_PROC_SERVICE = ext_proc_pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
EDS_SERVICE = "envoy.service.endpoint.v3.EndpointDiscoveryService"


@dataclass(frozen=True)
class SchedulerServiceConfig:
    """Everything the scheduler process needs."""

    listen: str
    registry_address: str
    max_queue_wait_seconds: float = 30.0
    max_queue_depth: int = 256
    lease_timeout_seconds: float = 900.0
    eject_seconds: float = 10.0
    catalog_cache_seconds: float = 5.0
    # AuthService, where usage is recorded; empty: usage is only logged (auth off).
    auth_address: str = ""
    max_message_bytes: int = 10 * 1024 * 1024
    shutdown_grace_seconds: float = 10.0
    # Where this process serves Prometheus `/metrics` ("host:port", port 0: any); "": nowhere.
    metrics_listen: str = ""

    def __post_init__(self) -> None:
        if not self.registry_address:
            raise ConfigError("scheduler: registry_address is empty; set endpoints.registry or server.host")
        if self.max_queue_depth < 0 or self.max_queue_wait_seconds < 0:
            raise ConfigError("scheduler: max_queue_depth and max_queue_wait_seconds must be >= 0")
        if self.lease_timeout_seconds <= 0 or self.eject_seconds < 0:
            raise ConfigError("scheduler: lease_timeout_seconds must be > 0 and eject_seconds >= 0")

    @classmethod
    def from_config(cls, cfg: LlmeshConfig, *, listen: str) -> SchedulerServiceConfig:
        """Take the scheduler's settings from the platform config."""
        s = cfg.scheduler
        return cls(
            listen=listen,
            registry_address=cfg.address_of("registry"),
            max_queue_wait_seconds=s.max_queue_wait_seconds,
            max_queue_depth=s.max_queue_depth,
            lease_timeout_seconds=s.lease_timeout_seconds,
            eject_seconds=s.eject_seconds,
            auth_address=cfg.address_of("auth") if cfg.auth.enabled else "",
            max_message_bytes=cfg.server.max_request_bytes,
            shutdown_grace_seconds=cfg.server.shutdown_grace_seconds,
        )


async def _reclaim_loop(pool: WorkerPool, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        pool.reclaim_expired()


async def _serve_when_synced(running: RunningServer, watch: RegistryWatch) -> None:
    await watch.synced.wait()
    await running.set_serving(True)
    log.info("scheduler ready: first registry snapshot applied")


async def start_scheduler(config: SchedulerServiceConfig) -> RunningServer:
    """Start the server and the registry watch; health turns SERVING at the first snapshot.

    Until then Acquire answers UNAVAILABLE, so callers retry rather than see "no worker".
    """
    running, _ = await _start(config)
    return running


async def _start(config: SchedulerServiceConfig) -> tuple[RunningServer, RegistryWatch]:
    traffic = TrafficWatch(config.registry_address)
    pool = WorkerPool(
        max_queue_depth=config.max_queue_depth,
        lease_timeout_s=config.lease_timeout_seconds,
        eject_s=config.eject_seconds,
        traffic=traffic.weights,
    )
    metrics.POOLS.watch(pool)
    registry_channel = service_channel(config.registry_address, "registry")
    catalog = ModelCatalog(
        registry_grpc.RegistryServiceStub(registry_channel), config.catalog_cache_seconds, served=pool.serves
    )
    # Usage goes to AuthService's ledger when auth is on (it settles the request's reservation).
    sink = AuthUsageSink(config.auth_address) if config.auth_address else LogUsageSink()
    # What GET /v1/monitoring/metrics sums up: fed by the picker and the desk.
    summary = TrafficSummary()
    desk = UsageDesk(sink, traffic=summary)
    servicer = SchedulerServicer(
        pool, catalog, max_queue_wait_s=config.max_queue_wait_seconds, usage=desk, traffic=summary
    )
    picker = EndpointPicker(
        pool, catalog, desk, max_queue_wait_s=config.max_queue_wait_seconds, traffic=summary
    )
    endpoints = WorkerEndpoints(pool)

    def add(server: aio.Server) -> list[str]:
        scheduler_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
        # Envoy's side of the scheduler: the endpoint picker (ext_proc) and the workers' endpoints (EDS).
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(picker, server)
        eds_grpc.add_EndpointDiscoveryServiceServicer_to_server(EndpointDiscovery(endpoints), server)
        return [SERVICE_NAME, EXT_PROC_SERVICE, EDS_SERVICE]

    running = await start_server("scheduler", config.listen, add, max_message_bytes=config.max_message_bytes)
    watch = RegistryWatch(config.registry_address, pool)
    watch.start()
    traffic.start()
    tasks = [
        asyncio.create_task(_serve_when_synced(running, watch), name="scheduler-ready"),
        asyncio.create_task(
            _reclaim_loop(pool, min(30.0, max(0.05, config.lease_timeout_seconds / 10))),
            name="scheduler-reclaim",
        ),
        asyncio.create_task(endpoints.run(), name="scheduler-endpoints"),
    ]

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Queued Acquires get UNAVAILABLE now (callers retry elsewhere) rather than at the grace's end.
        pool.close()

    running.on_shutdown.append(shutdown)
    running.after_stop.append(watch.stop)
    running.after_stop.append(traffic.stop)

    async def close_registry_channel() -> None:
        await registry_channel.close(None)
        desk.flush()
        if isinstance(sink, AuthUsageSink):
            await sink.close()

    running.after_stop.append(close_registry_channel)
    return running, watch


async def serve_scheduler(config: SchedulerServiceConfig, ready_file: Path | None = None) -> None:
    """Run the scheduler until SIGTERM/SIGINT; `ready_file` gets {"port": N} once it serves
    (after the first registry snapshot, so start the registry first)."""
    metrics_info = serve_metrics(config.metrics_listen)
    running, watch = await _start(config)
    stop = asyncio.create_task(serve_until_signal(running, config.shutdown_grace_seconds))
    synced = asyncio.create_task(watch.synced.wait())
    await asyncio.wait({stop, synced}, return_when=asyncio.FIRST_COMPLETED)
    if synced.done():
        write_ready_file(ready_file, port=running.port, **metrics_info)
    else:
        synced.cancel()
    await stop
