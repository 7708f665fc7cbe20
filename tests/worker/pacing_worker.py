"""A real worker (its own bootstrap, real vLLM engine) that records when each token became ready.

Run as a script (vLLM spawns its engine process, which re-imports __main__, hence the guard):
    PYTHONPATH=services:gen python tests/worker/pacing_worker.py MODEL_DIR PORT_FILE TRACE_FILE

"Ready" is the moment vLLM's output processor hands a request's delta to the request's queue
(`RequestOutputCollector.put`, in this process's event loop, after detokenization): from then on
only llmesh code (the engine adapter, the servicer, interceptors, grpc-python) stands between the
token and the client. Each put is one engine step's tokens for that request; `merged` says the
previous step's delta was still unread (vLLM then merges the two, as it does for a lagging reader).
The engine core's own timestamp of the step (`EngineCoreOutputs.timestamp`, another process on the
same monotonic clock) is kept too, for diagnosis.

The engine adapter's yields (what llmesh's own code received) and the moments this process's event
loop was busy or descheduled (a 2 ms timer ran late) are recorded too: a token that waits while the
worker could not run is delayed by load, not held back.

SIGUSR1 writes what was recorded so far to TRACE_FILE (atomically) and clears it; SIGTERM stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from llmesh.common.config import ModelConfig
from llmesh.worker.engine_factory import build_engine
from llmesh.worker.server import WorkerServiceConfig, start_worker

MODEL = "tiny-llama"
WATCH_PERIOD_S = 0.002
WATCH_LATE_S = 0.002


class ReadyTrace:
    def __init__(self) -> None:
        self.puts: dict[str, list[tuple[float, int, bool]]] = defaultdict(list)  # (t, tokens, merged)
        self.steps: dict[str, list[tuple[float, int]]] = defaultdict(list)  # engine step (t, tokens)
        # What the engine adapter handed on: (t, tokens, characters of text)
        self.adapter: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
        self.stalls: list[tuple[float, float]] = []  # (from, to): this event loop was busy or not running

    async def watch_loop(self) -> None:
        """Record when this process's event loop could not run a 2 ms timer on time."""
        while True:
            due = time.monotonic() + WATCH_PERIOD_S
            await asyncio.sleep(WATCH_PERIOD_S)
            now = time.monotonic()
            if now - due > WATCH_LATE_S:
                self.stalls.append((due, now))

    def wrap_adapter(self, engine: Any) -> None:
        """Time each chunk the engine adapter (VllmEngine.generate) hands to a servicer."""
        inner = engine.generate
        adapter = self.adapter

        async def generate(req: Any) -> AsyncIterator[Any]:
            rows = adapter[req.request_id]
            async with contextlib.aclosing(inner(req)) as stream:
                async for chunk in stream:
                    tokens = sum(len(c.token_ids) for c in chunk.choices)
                    rows.append((time.monotonic(), tokens, sum(len(c.text) for c in chunk.choices)))
                    yield chunk

        engine.generate = generate

    def install(self, llm: Any) -> None:
        from vllm.v1.engine.output_processor import RequestOutputCollector

        original_put = RequestOutputCollector.put
        puts = self.puts

        def put(collector: Any, output: Any) -> None:
            tokens = sum(len(c.token_ids) for c in getattr(output, "outputs", ()))
            puts[collector.request_id].append((time.monotonic(), tokens, collector.output is not None))
            original_put(collector, output)

        RequestOutputCollector.put = put  # type: ignore[method-assign,assignment]

        core = llm.engine_core
        inner_get = core.get_output_async
        steps = self.steps

        async def get_output_async() -> Any:
            outputs = await inner_get()
            for o in outputs.outputs:
                if o.new_token_ids:
                    steps[o.request_id].append((outputs.timestamp, len(o.new_token_ids)))
            return outputs

        core.get_output_async = get_output_async

    def dump(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        data = {"puts": self.puts, "steps": self.steps, "adapter": self.adapter, "stalls": self.stalls}
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
        self.puts.clear()
        self.steps.clear()
        self.adapter.clear()
        self.stalls = []


def write_port(path: Path, port: int) -> None:
    path.write_text(str(port))


async def main(model_dir: str, port_file: Path, trace_file: Path) -> None:
    model = ModelConfig(name=MODEL, path=model_dir, max_num_seqs=64, kv_cache_space_gb=1)
    engine = build_engine(model)
    running = await start_worker(WorkerServiceConfig(listen="127.0.0.1:0", model=model), engine)
    trace = ReadyTrace()
    trace.install(engine._llm)  # type: ignore[attr-defined]
    trace.wrap_adapter(engine)
    watcher = asyncio.create_task(trace.watch_loop())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, trace.dump, trace_file)
    write_port(port_file, running.port)
    await stop.wait()
    watcher.cancel()
    await running.stop(1)  # also shuts the engine down (joins its processes)


if __name__ == "__main__":
    from llmesh.common.server import run

    run(lambda: main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
    # Leave now that the engine is down: lingering library threads must not keep a test waiting.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
