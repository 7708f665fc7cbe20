"""What one benchmark run measures: frozen settings, built once from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# vllm serve, llmesh REST through Envoy, llmesh native gRPC through Envoy, the picker's added TTFT,
# llmesh REST with telemetry off and on, the latency ext_authz adds (auth on vs off).
ALL_TARGETS = ("baseline", "baseline-nice", "rest", "grpc", "overhead", "telemetry", "auth")
# `telemetry` starts two more stacks (minutes each on a small machine), `auth` (ext_authz's added
# latency, llmesh.bench.auth_latency) one of its own: asked for by name.
DEFAULT_TARGETS = ("baseline", "rest", "grpc", "overhead")
ENGINE_TARGETS = ("baseline", "baseline-nice", "rest", "grpc", "telemetry")
MODEL_NAME = "tiny-llama"


@dataclass(frozen=True)
class EngineSettings:
    """Engine settings shared by every target that runs vLLM, so all of them serve the same thing."""

    model_dir: Path
    served_name: str = MODEL_NAME
    max_model_len: int = 2048
    max_num_seqs: int = 64
    kv_cache_gb: float = 1.0
    dtype: str = "auto"
    enforce_eager: bool = True
    seed: int = 0

    def describe(self) -> dict[str, object]:
        return {
            "model_dir": str(self.model_dir),
            "served_name": self.served_name,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_gb": self.kv_cache_gb,
            "dtype": self.dtype,
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
        }


def default_num_prompts(concurrency: int) -> int:
    """32 requests per stream (at least 64, at most 2048): 64 / 512 / 2048 at 1 / 16 / 64 streams,
    about 15-40 s per level on 2 cores; a full three-target run takes ~10 minutes."""
    return min(2048, max(64, 32 * concurrency))


@dataclass(frozen=True)
class LoadSettings:
    """The load of one sweep, in vLLM's client's terms (random dataset, seed, ignore_eos)."""

    concurrency: tuple[int, ...] = (1, 16, 64)
    num_prompts: tuple[int, ...] | None = None  # one per level; None: default_num_prompts
    input_len: int = 64
    output_len: int = 64
    seed: int = 0
    warmups_per_stream: int = 1
    level_timeout_s: float = 900.0

    def prompts_for(self, concurrency: int) -> int:
        if self.num_prompts is not None:
            index = self.concurrency.index(concurrency)
            return self.num_prompts[min(index, len(self.num_prompts) - 1)]
        return default_num_prompts(concurrency)

    def warmups_for(self, concurrency: int) -> int:
        return min(64, self.warmups_per_stream * concurrency)


@dataclass(frozen=True)
class OverheadSettings:
    """The picker's added time to first token, engine taken out (ScriptedEngine double)."""

    tokens_per_second: float = 200.0  # per stream, like a fast GPU decode
    output_tokens: int = 8
    requests: int = 1000  # per path, for a p99 over 10 samples beyond it
    block: int = 50  # the two paths alternate in blocks of this many requests (drift hits both)
    warmup: int = 50


@dataclass(frozen=True)
class SoakSettings:
    """Rounds of requests at a fixed concurrency through Envoy, with RSS of every process after each."""

    rounds: int = 3
    requests: int = 1000
    concurrency: int = 64
    path: str = "rest"  # rest (vLLM's client) or grpc (ours)


@dataclass(frozen=True)
class BenchSettings:
    """Everything one `llmesh bench` run needs."""

    targets: tuple[str, ...]
    engine: EngineSettings
    load: LoadSettings
    overhead: OverheadSettings
    out_dir: Path
    soak: SoakSettings | None = None
    publish_dir: Path | None = None
    quick: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def wants(self, target: str) -> bool:
        return target in self.targets
