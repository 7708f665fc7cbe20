"""The embeddings side of the engine interface: what an embedding engine does besides `Engine`.

An embedding model is served by a worker like any other model (one engine per worker); the worker's
ModelService answers CreateEmbeddings when its engine is an `Embedder`, and refuses it with
INVALID_ARGUMENT for generation-only engines. Engine-agnostic, like `engine.py`: no torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from llmesh.common.errors import InvalidRequest

# One input: a text, or token ids of the model's own vocabulary.
EmbeddingInput = str | tuple[int, ...]


@dataclass(frozen=True)
class Embeddings:
    """One vector per input, in input order, and the tokens the inputs took."""

    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


@runtime_checkable
class Embedder(Protocol):
    """An engine that turns inputs into vectors (all of the `Engine` protocol besides)."""

    def dimensions(self) -> int:
        """The length of the model's vectors."""
        ...

    async def embed(
        self, model: str, inputs: Sequence[EmbeddingInput], dimensions: int | None = None
    ) -> Embeddings: ...


def not_a_generator(model: str) -> InvalidRequest:
    """What a chat or text completion asked of an embedding model gets."""
    return InvalidRequest(
        f"model {model!r} is an embedding model: it serves POST /v1/embeddings (CreateEmbeddings) only; "
        "send chat and text completions to a generation model (GET /v1/models lists them)"
    )


def check_dimensions(model: str, requested: int | None, native: int, matryoshka: bool) -> int | None:
    """The length to cut vectors to, or None for the model's own; refuses what the model cannot do."""
    if requested is None or requested == native:
        return None
    if not matryoshka:
        raise InvalidRequest(
            f"model {model!r} makes {native}-dimensional vectors and was not trained to be shortened; "
            f"omit dimensions or set it to {native}"
        )
    if requested > native:
        raise InvalidRequest(f"dimensions {requested} is more than model {model!r} makes ({native})")
    return requested
