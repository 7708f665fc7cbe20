"""Which engine adapter serves a model: chosen by the model's `engine` setting."""

from __future__ import annotations

from llmesh.common.config import ModelConfig
from llmesh.common.errors import InvalidRequest
from llmesh.worker.engine import Engine


def build_engine(model: ModelConfig) -> Engine:
    """The engine adapter the model's config names. Imports stay lazy: no torch unless vLLM is used."""
    if model.engine == "vllm":
        from llmesh.worker.vllm_engine import VllmEngine, VllmSettings

        if not model.path:
            raise InvalidRequest(
                f"model {model.name!r} has no path: set models[].path to a weights directory"
            )
        return VllmEngine(
            VllmSettings(
                model=model.path,
                served_name=model.name,
                dtype=model.dtype,
                max_model_len=model.max_model_len,
                max_num_seqs=model.max_num_seqs,
                gpu_memory_utilization=model.gpu_memory_utilization,
                enforce_eager=model.enforce_eager,
                trust_remote_code=model.trust_remote_code,
                kv_cache_space_gb=model.kv_cache_space_gb,
                chat_template=model.chat_template or None,
            )
        )
    if model.engine == "scripted":
        # The engine test double, only when a config asks for it by name (benchmarks, tests).
        from llmesh.worker.scripted_engine import ScriptedEngine, ScriptedSettings

        return ScriptedEngine(
            ScriptedSettings(model=model.name, max_model_len=model.max_model_len, tokens_per_second=0.0)
        )
    raise InvalidRequest(f"model {model.name!r}: unknown engine {model.engine!r}; use 'vllm'")
