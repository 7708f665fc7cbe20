#!/usr/bin/env python3
"""llmesh-worker: run `llmesh serve worker` as this pod's own worker (the worker images' entrypoint).

The replicas of a worker Deployment share one ConfigMap, yet each registers under its own id and
must advertise the address Envoy dials: its pod IP and its Envoy sidecar's mTLS port (the edge's
workers cluster is fed by EDS, which needs IPs). This writes the ConfigMap's YAML plus this pod's
`workers:` entry to a writable file, then execs `llmesh serve worker` (which becomes PID 1 and
gets SIGTERM itself: health NOT_SERVING, leave the pool, drain the streams).

Environment: POD_NAME and POD_IP (downward API); LLMESH_CONFIG (default /etc/llmesh/llmesh.yaml);
LLMESH_ADVERTISE_PORT (the sidecar's mTLS port); LLMESH_WORKER_PORT (where the app listens on
loopback, default 50060); LLMESH_WORKER_MODELS (comma-separated, default every configured model);
LLMESH_RUNTIME_DIR (writable, default /tmp/llmesh). Arguments are passed on to `llmesh serve worker`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml


def worker_config(base: dict, env: dict[str, str]) -> dict:
    """`base` with one `workers:` entry: this pod, advertising POD_IP:LLMESH_ADVERTISE_PORT."""
    ip = env["POD_IP"]
    host = f"[{ip}]" if ":" in ip else ip
    entry: dict[str, object] = {
        "worker_id": env["POD_NAME"],
        "port": int(env.get("LLMESH_WORKER_PORT", "50060")),
        "advertise_address": f"{host}:{int(env['LLMESH_ADVERTISE_PORT'])}",
        "labels": {"pod": env["POD_NAME"], "node": env.get("NODE_NAME", "")},
    }
    models = [m.strip() for m in env.get("LLMESH_WORKER_MODELS", "").split(",") if m.strip()]
    if models:
        entry["models"] = models
    return {**base, "workers": [entry]}


def main(argv: list[str]) -> None:
    env = dict(os.environ)
    missing = [name for name in ("POD_NAME", "POD_IP", "LLMESH_ADVERTISE_PORT") if not env.get(name)]
    if missing:
        sys.exit(f"llmesh-worker: set {', '.join(missing)} (downward API / the sidecar's mTLS port)")
    source = Path(env.get("LLMESH_CONFIG", "/etc/llmesh/llmesh.yaml"))
    base = yaml.safe_load(source.read_text()) or {}
    runtime = Path(env.get("LLMESH_RUNTIME_DIR", "/tmp/llmesh"))
    runtime.mkdir(parents=True, exist_ok=True)
    config = runtime / "worker.yaml"
    config.write_text(yaml.safe_dump(worker_config(base, env), sort_keys=False))
    command = ["llmesh", "--config", str(config), "serve", "worker", "--worker-id", env["POD_NAME"]]
    os.execvp("llmesh", [*command, "--data-dir", str(runtime), *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
