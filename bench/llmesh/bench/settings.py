"""What one benchmark run measures: frozen settings, built once from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ALL_TARGETS = ("baseline", "worker", "grpc", "rest", "overhead")
ENGINE_TARGETS = ("baseline", "worker", "grpc", "rest")
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


@dataclass(frozen=True)
class LoadSettings:
    """The load of one sweep: concurrency levels, request counts, prompt and output lengths.

    A level with no fixed count sends `per_stream` requests per concurrent stream (at least
    `min_requests`), so high concurrency still sees several waves, not one ramp up and down.
    """

    concurrency: tuple[int, ...] = (1, 16, 64)
    requests_per_level: int | None = None
    per_stream: int = 8
    min_requests: int = 64
    prompt_tokens: int = 64
    output_tokens: int = 64
    warmup_requests: int = 16
    level_timeout_s: float = 300.0
    request_timeout_s: float = 120.0
    http_client: str = "auto"  # aiohttp | httpx | auto (aiohttp when installed)

    def requests_for(self, concurrency: int) -> int:
        if self.requests_per_level is not None:
            return max(self.requests_per_level, 1)
        return max(self.min_requests, self.per_stream * concurrency)


@dataclass(frozen=True)
class OverheadSettings:
    """The scripted-engine micro-benchmark: fixed-rate latency and the gateway's messages/s ceiling."""

    tokens_per_second: float = 200.0  # per stream, like a fast GPU decode
    output_tokens: int = 32
    concurrency: tuple[int, ...] = (1, 16)
    requests: int = 200
    lease_requests: int = 300
    ceiling_concurrency: int = 32
    ceiling_output_tokens: int = 256
    ceiling_requests: int = 128
    ceiling_timeout_s: float = 120.0


@dataclass(frozen=True)
class BenchSettings:
    """Everything one `llmesh bench` run needs."""

    targets: tuple[str, ...]
    engine: EngineSettings
    load: LoadSettings
    overhead: OverheadSettings
    rounds: int
    out_dir: Path
    quick: bool = False

    def wants(self, target: str) -> bool:
        return target in self.targets
