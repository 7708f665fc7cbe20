"""`llmesh`: run services, the whole stack, the tiny model builder, config renderers, benchmarks."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmesh.common.config import ConfigError, load_config
from llmesh.common.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmesh",
        description="llmesh: a gRPC-first LLM serving platform (gateway, registry, scheduler, workers).",
    )
    parser.add_argument(
        "--config", type=Path, help="YAML config file (env LLMESH_<SECTION>__<KEY> overrides it)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from llmesh.cli import serve, up

    serve.add_arguments(sub.add_parser("serve", help="run one service: model|registry|auth|scheduler|worker"))
    up.add_arguments(sub.add_parser("up", help="run the whole stack on this machine (Ctrl-C stops it)"))

    tiny = sub.add_parser("tiny-model", help="build a tiny random-weight Llama + tokenizer that vLLM loads")
    tiny.add_argument("path", type=Path, help="output directory")
    tiny.add_argument("--seed", type=int, default=0)

    envoy = sub.add_parser("envoy-config", help="print the Envoy bootstrap for the configured services")
    try:
        from llmesh.edge.cli import add_arguments as add_envoy_arguments

        add_envoy_arguments(envoy)
    except ImportError:  # the edge extra is not installed
        pass

    bench = sub.add_parser("bench", help="benchmarks: llmesh vs vllm serve vs the worker alone")
    try:
        from llmesh.bench.cli import add_arguments as add_bench_arguments

        add_bench_arguments(bench)
    except ImportError:
        pass

    from llmesh.cli import auth

    auth.add_arguments(sub.add_parser("auth", help="users, API keys and usage (AuthService's database)"))

    sub.add_parser("gen", help="regenerate gen/ from proto/ (developers; same as `make gen`)")

    from llmesh.cli import db

    db.add_arguments(sub.add_parser("db", help="SQL migrations: `llmesh db upgrade`, `llmesh db current`"))

    from llmesh.cli import workers

    workers.add_arguments(
        sub.add_parser("workers", help="the cluster's workers and their load (from the registry)")
    )

    from llmesh.cli import certs

    certs.add_arguments(sub.add_parser("certs", help="a local CA and per-service mTLS certificates"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, os.environ)
    except ConfigError as error:
        print(f"llmesh: {error}", file=sys.stderr)
        return 2
    setup_logging(getattr(args, "service", args.command), cfg.logging.level, cfg.logging.json)
    if args.command == "serve":
        from llmesh.cli.serve import serve_main

        return serve_main(args, cfg)
    if args.command == "up":
        from llmesh.cli.up import up_main

        return up_main(args, args.config)
    if args.command == "tiny-model":
        from llmesh.worker.tiny_model import build_tiny_model

        path = build_tiny_model(args.path, seed=args.seed)
        print(path)
        return 0
    if args.command == "envoy-config":
        from llmesh.edge.cli import envoy_config_main

        return envoy_config_main(args, cfg)
    if args.command == "auth":
        from llmesh.cli.auth import auth_main

        return auth_main(args, cfg)
    if args.command == "bench":
        from llmesh.bench.cli import bench_main

        return bench_main(args, cfg)
    if args.command == "db":
        from llmesh.cli.db import db_main

        return db_main(args, cfg)
    if args.command == "workers":
        from llmesh.cli.workers import workers_main

        return workers_main(args, cfg)
    if args.command == "certs":
        from llmesh.cli.certs import certs_main

        return certs_main(args)
    from llmesh.cli.gen import main as gen_main

    return gen_main([])


if __name__ == "__main__":
    # The guard matters: vLLM's engine processes are spawned and re-import this module.
    sys.exit(main())
