"""The local supervisor of `llmesh up`: starts and stops worker processes while the stack runs.

The registry's StartModelInstance/StopModelInstance reach it over SupervisorService, served on
loopback in the `llmesh up` process (which owns the worker processes, so it is the only place that
can start or end one); the registry learns its address from `registry.supervisor_address`, which
`serve_supervisor` sets in the environment of every child started after it.

A started worker gets a config file of its own (the stack's, with one `workers:` entry for it), a
fresh id (`<model>-<n>`, never one a running child has) and port 0, so it collides with nothing;
it registers itself with the registry once its engine is loaded. A stopped worker gets SIGTERM:
it leaves the pool at once and lets its streams finish (server.shutdown_grace_seconds), and is
killed only if it outlives the drain timeout.

The server is grpc's threaded one: `llmesh up` is a plain blocking process, and each RPC only
launches or signals a process (waiting for readiness or exit happens on threads of their own).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import yaml

from llmesh.cli.stack import STOP_TIMEOUT_S, Child, Stack, StackError
from llmesh.common.config import LlmeshConfig
from llmesh.common.errors import FailedPrecondition, LlmeshError, NotFound
from llmesh.common.interceptors import status_for
from llmesh.registry.v1 import supervisor_service_pb2 as pb
from llmesh.registry.v1 import supervisor_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# The environment variable that carries the supervisor's address to the registry child.
ADDRESS_ENV = "LLMESH_REGISTRY__SUPERVISOR_ADDRESS"
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class WorkerSupervisor:
    """Starts and stops worker children of a `Stack` for named models (thread-safe)."""

    def __init__(self, stack: Stack, cfg: LlmeshConfig) -> None:
        if stack.config_path is None:
            raise ValueError("the stack needs a config file: started workers read their model from it")
        self._stack = stack
        self._cfg = cfg
        self._lock = threading.Lock()
        self._taken: set[str] = set()
        # Which model each worker serves: the config's workers now, started ones as they come.
        self._models: dict[str, str] = {}
        # Workers a stop was asked for: stopping one again is a no-op, also once it has exited.
        self._stopped: set[str] = set()
        for entry in cfg.workers:
            names = entry.models or tuple(m.name for m in cfg.models)
            if len(names) == 1:
                self._models[entry.worker_id] = cfg.model(names[0]).name

    def start_worker(self, model: str, labels: Mapping[str, str]) -> str:
        """Launch a worker for `model` (a catalog name); returns the id it will register with."""
        configured = [m for m in self._cfg.models if m.name == model or model in m.aliases]
        if not configured:
            raise FailedPrecondition(
                f"model {model!r} is in the catalog, but llmesh up's config ({self._stack.config_path}) "
                f"has no engine settings for it, and workers load their model from that config; "
                f"models it can start: {[m.name for m in self._cfg.models]}"
            )
        name = configured[0].name
        with self._lock:
            worker_id = self._fresh_id(name)
            config_path = self._write_config(worker_id, name, labels)
            child = self._stack.spawn(
                "worker",
                name=worker_id,
                listen=f"{self._cfg.server.host}:0",
                extra=("--worker-id", worker_id),
                config_path=config_path,
                on_demand=True,
            )
            self._models[worker_id] = name
        threading.Thread(target=self._watch, args=(child,), name=f"watch-{worker_id}", daemon=True).start()
        log.info("worker starting", extra={"worker_id": worker_id, "model": name, "pid": child.process.pid})
        return worker_id

    def stop_worker(self, worker_id: str, model: str, drain_timeout_s: float) -> str:
        """SIGTERM a worker child (idempotent: while it stops and after it stopped); returns the
        model it serves."""
        try:
            child = self._stack.child(worker_id)
        except KeyError:
            child = None
        if child is None and worker_id in self._stopped:
            return self._check_model(worker_id, model)
        if child is None or child.kind != "worker":
            with self._stack.lock:
                running = sorted(c.name for c in self._stack.children if c.kind == "worker")
            raise NotFound(
                f"worker {worker_id!r} is not a process this supervisor runs (workers it runs: {running}); "
                "a worker started elsewhere is stopped where it runs (or drained with DrainWorker)"
            )
        served = self._check_model(worker_id, model)
        if not child.stopping:
            child.stopping = True
            self._stopped.add(worker_id)
            timeout = drain_timeout_s or STOP_TIMEOUT_S
            threading.Thread(
                target=self._stop, args=(child, timeout), name=f"stop-{worker_id}", daemon=True
            ).start()
            log.info("worker stopping", extra={"worker_id": worker_id, "drain_timeout_s": timeout})
        return served

    def _check_model(self, worker_id: str, model: str) -> str:
        """The model the worker serves; FailedPrecondition when the caller named another."""
        served = self._models.get(worker_id, "")
        if model and served and model != served:
            raise FailedPrecondition(f"worker {worker_id!r} serves model {served!r}, not {model!r}")
        return served

    def _fresh_id(self, model: str) -> str:
        base = _ID_UNSAFE.sub("-", model).strip("-.") or "worker"
        with self._stack.lock:
            used = (
                {c.name for c in self._stack.children}
                | {w.worker_id for w in self._cfg.workers}
                | self._taken
            )
        n = 1
        while f"{base}-{n}" in used:
            n += 1
        self._taken.add(f"{base}-{n}")  # ids are never reused: logs and ready files stay apart
        return f"{base}-{n}"

    def _write_config(self, worker_id: str, model: str, labels: Mapping[str, str]) -> Path:
        """The stack's config with this worker as its only `workers:` entry."""
        assert self._stack.config_path is not None
        data: dict[str, Any] = yaml.safe_load(self._stack.config_path.read_text()) or {}
        data["workers"] = [{"worker_id": worker_id, "models": [model], "labels": dict(labels)}]
        monitoring = data.setdefault("monitoring", {})
        # Fixed metrics ports are numbered by the workers' order in the config: a free one instead.
        monitoring["metrics_base_port"] = 0
        path = self._stack.run_dir / "run" / f"{worker_id}.config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def _watch(self, child: Child) -> None:
        """Wait for a started worker to be ready, then for its end; drop it from the stack then."""
        try:
            self._stack.wait_ready(child)
            log.info("worker ready", extra={"worker_id": child.name, "port": child.info.get("port")})
        except StackError as error:
            if not child.stopping:
                log.error("worker failed to start", extra={"worker_id": child.name, "error": str(error)})
                self._stack.forget(child)
                return
        code = child.process.wait()
        if not child.stopping:
            log.error(
                "worker exited", extra={"worker_id": child.name, "code": code, "log": str(child.log_file)}
            )
            self._stack.forget(child)

    def _stop(self, child: Child, timeout_s: float) -> None:
        try:
            self._stack.stop(child.name, timeout_s)
        except KeyError:
            return  # stopped meanwhile (llmesh up is stopping everything)
        log.info("worker stopped", extra={"worker_id": child.name, "code": child.process.returncode})


class SupervisorServicer(pb_grpc.SupervisorServiceServicer):
    """SupervisorService over a `WorkerSupervisor`; domain errors become their status codes."""

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        self._supervisor = supervisor

    def StartWorker(
        self, request: pb.StartWorkerRequest, context: grpc.ServicerContext
    ) -> pb.StartWorkerResponse:
        """Launches a worker process for the model."""
        try:
            worker_id = self._supervisor.start_worker(request.model, dict(request.labels))
        except LlmeshError as error:
            context.abort(status_for(error), error.message)
        return pb.StartWorkerResponse(worker_id=worker_id)

    def StopWorker(
        self, request: pb.StopWorkerRequest, context: grpc.ServicerContext
    ) -> pb.StopWorkerResponse:
        """Signals a worker process to drain and exit."""
        try:
            model = self._supervisor.stop_worker(
                request.worker_id, request.model, request.drain_timeout_seconds
            )
        except LlmeshError as error:
            context.abort(status_for(error), error.message)
        return pb.StopWorkerResponse(model=model)


class SupervisorServer:
    """SupervisorService on loopback; `address` is what the registry dials."""

    def __init__(self, server: grpc.Server, address: str) -> None:
        self._server = server
        self.address = address

    def stop(self) -> None:
        """Refuse new RPCs at once (a start racing the stack's shutdown gets UNAVAILABLE)."""
        self._server.stop(grace=None)


def serve_supervisor(stack: Stack, cfg: LlmeshConfig) -> SupervisorServer:
    """Serve SupervisorService for `stack` on 127.0.0.1 (port 0), tell children started from now
    on where it is, and stop it first when the stack stops."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="supervisor"))
    pb_grpc.add_SupervisorServiceServicer_to_server(SupervisorServicer(WorkerSupervisor(stack, cfg)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    running = SupervisorServer(server, f"127.0.0.1:{port}")
    stack.env[ADDRESS_ENV] = running.address
    stack.on_stop.append(running.stop)
    log.info("supervisor ready", extra={"address": running.address})
    return running
