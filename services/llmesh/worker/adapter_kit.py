"""Pieces the text-streaming adapters (openai, anthropic, llamacpp) share.

- `ChoiceStream` assembles the interface's chunks from pieces of text: cumulative completion
  tokens, finish reasons, and the final chunk that names every choice's end.
- `refuse_unsupported` turns a sampling parameter an engine cannot honour into a clear
  InvalidRequest instead of silently ignoring it.
- `RequestTracker` keeps the running/waiting counts and output rate `load()` reports, and refuses a
  request id that is already streaming.
- `encode_input` runs an adapter's tokenizer inline for short input, on a thread for long input.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

from llmesh.common.errors import Conflict, InvalidRequest
from llmesh.worker.engine import (
    ChoiceDelta,
    EngineLoad,
    GenerationChunk,
    GenerationInput,
    Sampling,
    TokenRate,
)

# Tokenizing more text than this moves off the event loop so other streams keep flowing.
INLINE_TOKENIZE_CHARS = 4096

# Values that ask for nothing: an explicit 0 penalty is as good as none.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "top_k": (0, -1),
    "min_p": (0.0,),
    "min_tokens": (0,),
    "top_p": (1.0,),
    "top_logprobs": (0,),
}


def refuse_unsupported(s: Sampling, engine: str, supported: Iterable[str]) -> None:
    """Raise InvalidRequest naming the set sampling parameters the `engine` cannot honour."""
    allowed = set(supported)
    refused = []
    for f in dataclasses.fields(Sampling):
        value = getattr(s, f.name)
        if f.name in allowed or value == f.default or value in _NEUTRAL.get(f.name, ()):
            continue
        refused.append(f.name)
    if refused:
        raise InvalidRequest(
            f"the {engine} engine does not support {', '.join(refused)}; leave "
            f"{'it' if len(refused) == 1 else 'them'} unset for this model"
        )


class ChoiceStream:
    """Builds GenerationChunks for one request from text pieces, choice by choice."""

    def __init__(self, n: int = 1, prompt_tokens: int = 0) -> None:
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.texts = [""] * n
        self.finish: dict[int, tuple[str, str | None]] = {}

    def piece(
        self,
        index: int,
        text: str,
        *,
        tokens: int = 1,
        token_ids: Sequence[int] = (),
        finish_reason: str | None = None,
        stop_reason: str | None = None,
    ) -> ChoiceDelta:
        """Record what choice `index` produced; `tokens` is how many tokens that was (or our best count)."""
        if not 0 <= index < self.n:
            raise ValueError(f"choice index {index} is outside 0..{self.n - 1}")
        self.texts[index] += text
        self.completion_tokens += tokens
        if finish_reason is not None:
            self.finish[index] = (finish_reason, stop_reason)
        return ChoiceDelta(index, text, tuple(token_ids), (), finish_reason, stop_reason)

    def chunk(self, deltas: Sequence[ChoiceDelta]) -> GenerationChunk:
        """A chunk of the running stream."""
        return GenerationChunk(tuple(deltas), self.prompt_tokens, self.completion_tokens, False)

    def unfinished(self) -> list[int]:
        return [i for i in range(self.n) if i not in self.finish]

    def final(
        self,
        deltas: Sequence[ChoiceDelta] = (),
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> GenerationChunk:
        """The last chunk: exact usage where known, and every choice's end (repeated if it came earlier)."""
        if self.unfinished():
            raise ValueError(f"choices {self.unfinished()} have not finished")
        if prompt_tokens is not None:
            self.prompt_tokens = prompt_tokens
        if completion_tokens is not None:
            self.completion_tokens = completion_tokens
        present = {d.index for d in deltas}
        ends = [ChoiceDelta(i, "", (), (), *self.finish[i]) for i in range(self.n) if i not in present]
        choices = sorted([*deltas, *ends], key=lambda d: d.index)
        return GenerationChunk(tuple(choices), self.prompt_tokens, self.completion_tokens, True)


class RequestTracker:
    """What an adapter has in flight, for `load()`; one stream per request id."""

    def __init__(self) -> None:
        self.rate = TokenRate()
        self.waiting = 0
        self._running: set[str] = set()

    @property
    def running(self) -> int:
        return len(self._running)

    @contextlib.contextmanager
    def track(self, request_id: str) -> Iterator[None]:
        """Count the request as running while the block runs; refuse an id already streaming."""
        if request_id in self._running:
            raise Conflict(f"request_id {request_id!r} is already streaming; use a unique id per request")
        self._running.add(request_id)
        try:
            yield
        finally:
            self._running.discard(request_id)

    @contextlib.contextmanager
    def queued(self) -> Iterator[None]:
        """Count a request as waiting (for a slot) while the block runs."""
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=max(0, self.running - self.waiting),
            waiting=self.waiting,
            kv_cache_usage=0.0,
            output_tokens_per_second=self.rate.rate(),
            prefix_cache_hit_rate=0.0,
        )


async def encode_input(
    input: GenerationInput, encode: Callable[[GenerationInput, bool], list[int]], add_special_tokens: bool
) -> list[int]:
    """`encode(input, add_special_tokens)`, off the event loop when the input is long; token ids as given."""
    if input.prompt_token_ids is not None:
        return list(input.prompt_token_ids)
    size = len(input.prompt or "") + sum(len(m.content) for m in input.chat or ())
    if size > INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(encode, input, add_special_tokens)
    return encode(input, add_special_tokens)
