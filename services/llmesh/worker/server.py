"""Worker process: one engine behind ModelService (public inference) and WorkerService (control)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from grpc import aio

from llmesh.common.config import LlmeshConfig, ModelConfig, WorkerConfig
from llmesh.common.cpu_placement import keep_own_processes_off_engine_cpus
from llmesh.common.errors import InvalidRequest
from llmesh.common.metrics import serve_metrics
from llmesh.common.server import RunningServer, serve_until_signal, start_server, write_ready_file
from llmesh.model.openai_requests import ModelLimits
from llmesh.model.v1 import model_service_pb2 as model_pb
from llmesh.model.v1 import model_service_pb2_grpc as model_grpc
from llmesh.registry.membership import WorkerMembership
from llmesh.registry.v1 import registry_service_pb2 as registry_pb
from llmesh.worker import convert
from llmesh.worker.activity import Activity
from llmesh.worker.engine import Engine, Supervised
from llmesh.worker.engine_factory import build_engine
from llmesh.worker.engine_watch import watch_engine
from llmesh.worker.lease_reporter import LeaseReporter
from llmesh.worker.model_servicer import WorkerModelServicer
from llmesh.worker.servicer import WorkerServicer
from llmesh.worker.v1 import worker_service_pb2 as pb
from llmesh.worker.v1 import worker_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerServiceConfig:
    """What one worker process needs: where to listen, what to serve, whom to tell."""

    listen: str
    model: ModelConfig
    worker_id: str = "worker-0"
    registry_address: str = ""  # empty: do not register (a worker called directly)
    scheduler_address: str = ""  # where cancelled streams' usage is reported; empty: nowhere
    advertise_host: str = "127.0.0.1"
    advertise_address: str = ""  # empty: advertise_host:bound port
    heartbeat_interval_seconds: float = 2.0
    max_message_bytes: int = 10 * 1024 * 1024
    shutdown_grace_seconds: float = 30.0
    drain_delay_seconds: float = 1.0
    labels: dict[str, str] = field(default_factory=dict)
    # Where this process serves Prometheus `/metrics` ("host:port", port 0: any); "": nowhere.
    metrics_listen: str = ""
    # Move this process and the engine's unbound processes off the CPUs the engine computes on.
    isolate_engine_cpus: bool = True

    @classmethod
    def from_config(cls, cfg: LlmeshConfig, worker: WorkerConfig, *, listen: str) -> WorkerServiceConfig:
        names = worker.models or tuple(m.name for m in cfg.models)
        if len(names) != 1:
            raise InvalidRequest(
                f"worker {worker.worker_id} must serve exactly one model (one engine per worker); "
                f"got {list(names)}"
            )
        return cls(
            listen=listen,
            model=cfg.model(names[0]),
            worker_id=worker.worker_id,
            registry_address=cfg.address_of("registry"),
            scheduler_address=cfg.address_of("scheduler"),
            advertise_host=cfg.server.host,
            advertise_address=worker.advertise_address,
            heartbeat_interval_seconds=cfg.registry.heartbeat_interval_seconds,
            max_message_bytes=cfg.server.max_request_bytes,
            shutdown_grace_seconds=cfg.server.shutdown_grace_seconds,
            drain_delay_seconds=cfg.server.drain_delay_seconds,
            labels=dict(worker.labels),
            isolate_engine_cpus=cfg.server.isolate_engine_cpus,
        )


async def start_worker(config: WorkerServiceConfig, engine: Engine | None = None) -> RunningServer:
    """Start the server (NOT_SERVING), load the engine, go SERVING, then join the registry."""
    engine = engine or build_engine(config.model)
    running: RunningServer | None = None

    activity = Activity(config.worker_id)
    membership: WorkerMembership | None = None
    left_pool = False

    async def leave_pool() -> None:
        nonlocal left_pool
        if membership is not None and not left_pool:
            left_pool = True
            await membership.stop()

    async def on_drain() -> None:
        # Out of the pool first, so the picker stops choosing us; then NOT_SERVING.
        await leave_pool()
        if running is not None:
            await running.set_serving(False)

    servicer = WorkerServicer(
        engine,
        activity,
        max_num_seqs=config.model.max_num_seqs,
        labels=config.labels,
        on_drain=on_drain,
    )
    limits = ModelLimits(
        name=config.model.name,
        max_output_tokens=config.model.max_output_tokens or config.model.max_model_len,
        max_model_len=config.model.max_model_len,
    )
    leases = LeaseReporter(config.scheduler_address) if config.scheduler_address else None
    model_servicer = WorkerModelServicer(engine, limits, activity, config.model.aliases, leases)

    def add(server: aio.Server) -> list[str]:
        pb_grpc.add_WorkerServiceServicer_to_server(servicer, server)
        model_grpc.add_ModelServiceServicer_to_server(model_servicer, server)
        return [
            pb.DESCRIPTOR.services_by_name["WorkerService"].full_name,
            model_pb.DESCRIPTOR.services_by_name["ModelService"].full_name,
        ]

    running = await start_server(
        f"worker {config.worker_id}", config.listen, add, max_message_bytes=config.max_message_bytes
    )
    began = time.monotonic()
    try:
        await engine.start()
    except BaseException:
        await running.stop(0)
        raise
    log.info("engine ready", extra={"engine_start_s": round(time.monotonic() - began, 2)})
    running.after_stop.append(engine.shutdown)
    if leases is not None:
        running.after_stop.append(leases.close)
    await running.set_serving(True)

    if config.registry_address:
        address = config.advertise_address or f"{config.advertise_host}:{running.port}"
        info = engine.models()
        membership = WorkerMembership(
            config.registry_address,
            registry_pb.Worker(
                worker_id=config.worker_id,
                address=address,
                models=[m.name for m in info],
                engine=info[0].engine if info else config.model.engine,
                capacity=config.model.max_num_seqs,
                labels=config.labels,
                # The catalog version this worker serves: traffic splits route by it.
                model_versions={m.name: config.model.version for m in info},
            ),
            lambda: convert.load_to_proto(engine.load()),
            config.heartbeat_interval_seconds,
        )
        await membership.start()
        # Leave the registry first so the picker stops choosing us while in-flight streams finish.
        running.on_shutdown.append(leave_pool)
    if isinstance(engine, Supervised):
        server = running

        async def engine_failed(reason: str) -> None:
            log.error("engine failed; leaving the pool and exiting", extra={"reason": reason})
            await leave_pool()
            await server.set_serving(False)
            server.fail(f"engine failed: {reason}")

        watcher = asyncio.create_task(watch_engine(engine, engine_failed), name="engine-watch")

        async def stop_watching() -> None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

        running.on_shutdown.append(stop_watching)
    return running


async def serve_worker(config: WorkerServiceConfig, ready_file: Path | None = None) -> None:
    """Run until SIGTERM/SIGINT."""
    # Before the engine loads, so a scrape already sees the process while it starts.
    metrics = serve_metrics(config.metrics_listen)
    running = await start_worker(config)
    # Here, not in start_worker: only a worker's own process may move itself (tests run workers
    # inside pytest). The supervisor keeps the rest of the stack off `engine_cpus` too.
    engine_cpus = keep_own_processes_off_engine_cpus() if config.isolate_engine_cpus else frozenset()
    write_ready_file(
        ready_file, port=running.port, worker_id=config.worker_id, engine_cpus=sorted(engine_cpus), **metrics
    )
    await serve_until_signal(running, config.shutdown_grace_seconds, config.drain_delay_seconds)
