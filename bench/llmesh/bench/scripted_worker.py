"""A worker process around the ScriptedEngine double, for the overhead benchmark ONLY.

The double never runs a model: it emits "tok0 tok1 ..." at a fixed rate per stream (or as fast as
the event loop allows with `--tokens-per-second 0`), which takes the engine out of the picture so
the cost of the platform itself — gRPC hops, the gateway, the scheduler lease — is what remains.
It is never a serving engine; `llmesh serve worker` only builds it when a config names
`engine: scripted`, and then without a rate. This module sets the rate.

    python -m llmesh.bench.scripted_worker --registry 127.0.0.1:50052 --model scripted-fixed \
        --worker-id scripted-fixed --tokens-per-second 200 --ready-file /tmp/w.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmesh.common.config import ModelConfig
from llmesh.common.logs import setup_logging
from llmesh.common.server import run, serve_until_signal, write_ready_file
from llmesh.worker.scripted_engine import ScriptedEngine, ScriptedSettings
from llmesh.worker.server import WorkerServiceConfig, start_worker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="benchmark-only worker around the ScriptedEngine double")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--registry", default="", help="registry address; empty: do not register")
    parser.add_argument("--model", required=True, help="model name (must be in the registry's catalog)")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument(
        "--tokens-per-second", type=float, default=0.0, help="per stream; 0: as fast as possible"
    )
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--log-level", default="INFO")
    return parser


async def serve(args: argparse.Namespace) -> None:
    model = ModelConfig(
        name=args.model,
        engine="scripted",
        max_model_len=args.max_model_len,
        max_output_tokens=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
    )
    config = WorkerServiceConfig(
        listen=args.listen,
        model=model,
        worker_id=args.worker_id,
        registry_address=args.registry,
        heartbeat_interval_seconds=1.0,
        shutdown_grace_seconds=2.0,
    )
    engine = ScriptedEngine(
        ScriptedSettings(
            model=args.model, max_model_len=args.max_model_len, tokens_per_second=args.tokens_per_second
        )
    )
    running = await start_worker(config, engine=engine)
    write_ready_file(args.ready_file, port=running.port, worker_id=args.worker_id)
    await serve_until_signal(running, config.shutdown_grace_seconds)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging("worker", args.log_level, True)
    run(lambda: serve(args))


if __name__ == "__main__":
    main()
