"""`llmesh workers`: the cluster's members and their load, as the registry sees them.

One ListWorkers call to the registry (`--registry HOST:PORT`, default: the config's registry
address); a table, or `--json` for scripts. Against a stack with mesh TLS (`llmesh up --tls`) it
asks over mTLS with the `edge` identity's certificate from `--tls-dir`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from llmesh.common.config import LlmeshConfig
from llmesh.common.tls import EDGE_IDENTITY, SERVICE_IDENTITY, MeshIdentity, MeshTlsError
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc

COLUMNS = ("ID", "ADDRESS", "MODELS", "STATUS", "RUNNING", "WAITING", "CAPACITY", "KV", "LABELS", "HEARTBEAT")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", help="the registry's HOST:PORT (default: from the config)")
    parser.add_argument("--model", default="", help="only workers serving this model (name or alias)")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the registry")
    parser.add_argument(
        "--tls-dir",
        type=Path,
        help="the mesh's certificates (llmesh up --tls: DATA_DIR/tls); the registry is asked over mTLS "
        "with the edge identity's certificate (default: tls.dir when the config has tls.enabled)",
    )


def registry_channel(address: str, tls_dir: Path | None) -> grpc.Channel:
    """Plaintext, or mTLS as the `edge` identity (an operator's tool, like the README's grpcurl)."""
    if tls_dir is None:
        return grpc.insecure_channel(address)
    identity = MeshIdentity.load(tls_dir, EDGE_IDENTITY)
    return grpc.secure_channel(
        address,
        identity.channel_credentials(),
        options=[("grpc.ssl_target_name_override", SERVICE_IDENTITY["registry"])],
    )


def status_name(status: int) -> str:
    """READY, DRAINING ... from WORKER_STATUS_READY, WORKER_STATUS_DRAINING ..."""
    return registry_pb2.WorkerStatus.Name(status).removeprefix("WORKER_STATUS_")


def worker_row(worker: registry_pb2.Worker, now: float) -> dict[str, Any]:
    """What `llmesh workers` shows of one worker; heartbeat_age_s is None before the first one."""
    beat = worker.last_heartbeat.ToMicroseconds() / 1e6 if worker.HasField("last_heartbeat") else None
    return {
        "worker_id": worker.worker_id,
        "address": worker.address,
        "models": list(worker.models),
        "engine": worker.engine,
        "status": status_name(worker.status),
        "running_requests": worker.load.running_requests,
        "waiting_requests": worker.load.waiting_requests,
        "capacity": worker.capacity,
        "kv_cache_usage": round(worker.load.kv_cache_usage, 4),
        "output_tokens_per_second": round(worker.load.output_tokens_per_second, 2),
        "labels": dict(sorted(worker.labels.items())),
        "heartbeat_age_s": None if beat is None else round(max(0.0, now - beat), 1),
    }


def render_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns, one line per worker."""
    lines = [list(COLUMNS)]
    for r in rows:
        lines.append(
            [
                r["worker_id"],
                r["address"],
                ",".join(r["models"]),
                r["status"],
                str(r["running_requests"]),
                str(r["waiting_requests"]),
                str(r["capacity"]),
                f"{r['kv_cache_usage']:.0%}",
                ",".join(f"{k}={v}" for k, v in r["labels"].items()) or "-",
                "-" if r["heartbeat_age_s"] is None else f"{r['heartbeat_age_s']:.1f}s ago",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def workers_main(args: argparse.Namespace, cfg: LlmeshConfig) -> int:
    """Print the registry's live workers; exit 1 (reason on stderr) when it cannot be asked."""
    address = args.registry or cfg.address_of("registry")
    # `make run`'s data directory is .llmesh; tls.dir names another.
    tls_dir = args.tls_dir or (Path(cfg.tls.dir or ".llmesh/tls") if cfg.tls.enabled else None)
    try:
        channel = registry_channel(address, tls_dir)
    except MeshTlsError as error:
        print(f"llmesh workers: {error}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = registry_grpc.RegistryServiceStub(channel).ListWorkers(
                registry_pb2.ListWorkersRequest(model=args.model), timeout=args.timeout
            )
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            details = error.details()  # type: ignore[attr-defined]
            print(f"llmesh workers: registry at {address}: {code.name}: {details}", file=sys.stderr)
            return 1
    now = time.time()
    rows = [worker_row(w, now) for w in reply.workers]
    if args.json:
        print(json.dumps({"registry": address, "workers": rows}, indent=2))
    elif rows:
        print(render_table(rows))
    else:
        print(
            f"no live workers registered at {address}" + (f" for model {args.model!r}" if args.model else "")
        )
    return 0
