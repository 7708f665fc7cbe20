"""Which engine adapter serves a model: chosen by the model's `engine` setting.

Imports stay lazy: no torch unless vLLM is used, no llama.cpp unless llamacpp is. API keys are
resolved here, from the model's config or the environment variable it names, so the adapters get
them as plain settings and never read the environment themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from llmesh.common.config import ModelConfig
from llmesh.common.errors import InvalidRequest
from llmesh.worker.engine import Engine

# Anthropic's conventional variable, used only for Anthropic's own endpoint (no base_url), so a key
# meant for Anthropic is never sent to some other server.
ANTHROPIC_KEY_ENV = "ANTHROPIC_API_KEY"


def build_engine(model: ModelConfig, env: Mapping[str, str] | None = None) -> Engine:
    """The engine adapter the model's config names. `env` (default: the process environment) is
    where `api_key_env` is looked up."""
    builder = _BUILDERS.get(model.engine)
    if builder is None:
        raise InvalidRequest(
            f"model {model.name!r}: unknown engine {model.engine!r}; use one of {', '.join(ENGINES)}"
        )
    return builder(model, os.environ if env is None else env)


def _vllm(model: ModelConfig, env: Mapping[str, str]) -> Engine:
    from llmesh.worker.vllm_engine import VllmEngine, VllmSettings

    return VllmEngine(
        VllmSettings(
            model=_required_path(model, "a weights directory"),
            served_name=model.name,
            dtype=model.dtype,
            max_model_len=model.max_model_len,
            max_num_seqs=model.max_num_seqs,
            gpu_memory_utilization=model.gpu_memory_utilization,
            enforce_eager=model.enforce_eager,
            trust_remote_code=model.trust_remote_code,
            kv_cache_space_gb=model.kv_cache_space_gb,
            chat_template=model.chat_template or None,
            tool_parser=model.tool_parser,
            engine_nice=model.engine_nice,
        )
    )


def _vllm_embed(model: ModelConfig, env: Mapping[str, str]) -> Engine:
    from llmesh.worker.vllm_embedding_engine import VllmEmbeddingEngine
    from llmesh.worker.vllm_engine import VllmSettings

    return VllmEmbeddingEngine(
        VllmSettings(
            model=_required_path(model, "an embedding model directory"),
            served_name=model.name,
            dtype=model.dtype,
            max_model_len=model.max_model_len,
            max_num_seqs=model.max_num_seqs,
            enforce_eager=model.enforce_eager,
            trust_remote_code=model.trust_remote_code,
            kv_cache_space_gb=model.kv_cache_space_gb,
            engine_nice=model.engine_nice,
        )
    )


def _openai(model: ModelConfig, env: Mapping[str, str]) -> Engine:
    from llmesh.worker.openai_engine import OpenAIEngine, OpenAISettings

    return OpenAIEngine(
        OpenAISettings(
            served_name=model.name,
            base_url=model.base_url,
            api_key=_api_key(model, env),
            upstream_model=model.upstream_model,
            max_model_len=model.max_model_len,
            max_output_tokens=model.max_output_tokens,
            tokenizer=model.tokenizer,
            chat_template=model.chat_template,
            timeout_s=model.request_timeout_seconds,
            max_retries=model.max_retries,
        )
    )


def _anthropic(model: ModelConfig, env: Mapping[str, str]) -> Engine:
    from llmesh.worker.anthropic_engine import AnthropicEngine, AnthropicSettings

    return AnthropicEngine(
        AnthropicSettings(
            served_name=model.name,
            upstream_model=model.upstream_model or model.name,
            base_url=model.base_url,
            api_key=_api_key(model, env, default_env="" if model.base_url else ANTHROPIC_KEY_ENV),
            max_model_len=model.max_model_len,
            max_output_tokens=model.max_output_tokens,
            timeout_s=model.request_timeout_seconds,
            max_retries=model.max_retries,
        )
    )


def _llamacpp(model: ModelConfig, env: Mapping[str, str]) -> Engine:
    from llmesh.worker.llamacpp_engine import LlamaCppEngine, LlamaCppSettings

    return LlamaCppEngine(
        LlamaCppSettings(
            model_path=_required_path(model, "a .gguf file"),
            served_name=model.name,
            n_ctx=model.max_model_len,
            n_threads=model.n_threads or None,
            n_parallel=model.n_parallel,
            max_output_tokens=model.max_output_tokens,
            chat_template=model.chat_template,
        )
    )


def _scripted(model: ModelConfig, env: Mapping[str, str]) -> Engine:
    # The engine test double, only when a config asks for it by name (benchmarks, tests).
    from llmesh.worker.scripted_engine import ScriptedEngine, ScriptedSettings

    return ScriptedEngine(
        ScriptedSettings(model=model.name, max_model_len=model.max_model_len, tokens_per_second=0.0)
    )


_BUILDERS: dict[str, Callable[[ModelConfig, Mapping[str, str]], Engine]] = {
    "vllm": _vllm,
    "vllm-embed": _vllm_embed,
    "openai": _openai,
    "anthropic": _anthropic,
    "llamacpp": _llamacpp,
    "scripted": _scripted,
}
ENGINES = tuple(_BUILDERS)


def _required_path(model: ModelConfig, what: str) -> str:
    if not model.path:
        raise InvalidRequest(
            f"model {model.name!r} (engine {model.engine!r}) has no path: set models[].path to {what}"
        )
    return model.path


def _api_key(model: ModelConfig, env: Mapping[str, str], default_env: str = "") -> str:
    """The key from the config, else from the variable `api_key_env` names (an unset variable it
    names is a configuration error), else from `default_env` if given and set, else none."""
    if model.api_key:
        return model.api_key
    if model.api_key_env:
        if model.api_key_env not in env:
            raise InvalidRequest(
                f"model {model.name!r}: environment variable {model.api_key_env!r} (models[].api_key_env) "
                "is not set; export the upstream's API key in it"
            )
        return env[model.api_key_env]
    return env.get(default_env, "") if default_env else ""
