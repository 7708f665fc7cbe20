"""`llmesh serve <service>`: run one service in this process until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from llmesh.common.config import LlmeshConfig, WorkerConfig
from llmesh.common.server import ServiceFailed, run
from llmesh.common.tls import MeshTlsError, setup_mesh_tls
from llmesh.common.tracing import setup_tracing

SERVICES = ("registry", "auth", "scheduler", "worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("service", choices=SERVICES, help="which service to run")
    parser.add_argument("--listen", help="host:port to listen on (default: from the config's server section)")
    parser.add_argument("--worker-id", help="worker: which `workers:` entry to run (default: the first)")
    parser.add_argument("--data-dir", type=Path, default=Path(".llmesh"), help="SQLite file location")
    parser.add_argument("--ready-file", type=Path, help="write {port: ...} here once serving (supervisors)")
    parser.add_argument(
        "--models-file", type=Path, help="registry: a models YAML upserted into the catalog at start-up"
    )
    parser.add_argument("--trace-console", action="store_true", help="print OpenTelemetry spans to stderr")
    parser.add_argument(
        "--registry",
        help="HOST:PORT of the registry to join/dial (a worker on another machine joins the cluster)",
    )
    parser.add_argument("--scheduler", help="HOST:PORT of the scheduler (overrides endpoints.scheduler)")


def _worker_entry(cfg: LlmeshConfig, worker_id: str | None) -> tuple[int, WorkerConfig]:
    workers = cfg.workers or (WorkerConfig(),)
    if worker_id is None:
        return 0, workers[0]
    for i, w in enumerate(workers):
        if w.worker_id == worker_id:
            return i, w
    return len(workers), WorkerConfig(worker_id=worker_id)


def database_url(cfg: LlmeshConfig, data_dir: Path) -> str:
    """The configured SQL URL, or the embedded default: a SQLite file in the data directory."""
    if cfg.database.url:
        return cfg.database.url
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(data_dir / 'llmesh.db').resolve()}"


def serve_main(args: argparse.Namespace, cfg: LlmeshConfig) -> int:
    """Run one service until it is signalled (exit 0) or fails (exit 1, the reason on stderr)."""
    given = {name: getattr(args, name) for name in ("registry", "scheduler") if getattr(args, name, None)}
    if given:  # the flags win over the config's endpoints
        cfg = dataclasses.replace(cfg, endpoints=dataclasses.replace(cfg.endpoints, **given))
    try:
        _serve(args, cfg)
    except ServiceFailed as failed:
        print(f"llmesh serve {args.service}: {failed}", file=sys.stderr)
        return 1
    except MeshTlsError as error:
        print(f"llmesh serve {args.service}: {error}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace, cfg: LlmeshConfig) -> None:
    host = cfg.server.host
    setup_tracing(
        f"llmesh-{args.service}",
        otlp_endpoint=cfg.monitoring.otlp_endpoint,
        console=args.trace_console or cfg.monitoring.trace_console,
    )
    setup_mesh_tls(cfg, args.service, args.data_dir)
    if args.service == "registry":
        from llmesh.registry.server import RegistryServiceConfig, serve_registry

        listen = args.listen or f"{host}:{cfg.server.registry_port}"
        reg = RegistryServiceConfig.from_config(
            cfg, listen=listen, database_url=database_url(cfg, args.data_dir), models_file=args.models_file
        )
        reg = dataclasses.replace(reg, metrics_listen=cfg.metrics_listen("registry"))
        run(lambda: serve_registry(reg, args.ready_file))
    elif args.service == "scheduler":
        from llmesh.scheduler.server import SchedulerServiceConfig, serve_scheduler

        listen = args.listen or f"{host}:{cfg.server.scheduler_port}"
        sched = dataclasses.replace(
            SchedulerServiceConfig.from_config(cfg, listen=listen),
            metrics_listen=cfg.metrics_listen("scheduler"),
        )
        run(lambda: serve_scheduler(sched, args.ready_file))
    elif args.service == "auth":
        from llmesh.auth.server import AuthServiceConfig, serve_auth

        listen = args.listen or f"{host}:{cfg.server.auth_port}"
        auth = AuthServiceConfig.from_config(
            cfg, listen=listen, database_url=database_url(cfg, args.data_dir)
        )
        auth = dataclasses.replace(auth, metrics_listen=cfg.metrics_listen("auth"))
        run(lambda: serve_auth(auth, args.ready_file))
    else:
        from llmesh.worker.server import WorkerServiceConfig, serve_worker

        index, entry = _worker_entry(cfg, args.worker_id)
        listen = args.listen or f"{host}:{entry.port or cfg.server.worker_base_port + index}"
        worker = dataclasses.replace(
            WorkerServiceConfig.from_config(cfg, entry, listen=listen),
            metrics_listen=cfg.metrics_listen("worker", index),
        )
        run(lambda: serve_worker(worker, args.ready_file))
