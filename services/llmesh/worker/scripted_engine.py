"""ScriptedEngine: a TEST DOUBLE of the engine interface. It never runs a model.

It emits the deterministic words "tok0 tok1 tok2 ..." (token id i % vocab_size for word i) at a
configurable rate, and honours the parts of the contract the rest of the system depends on:
max_tokens, min_tokens, n, stop strings, stop token ids, a scripted end-of-sequence (unless
ignore_eos), logprobs, cancellation (the request is aborted and `running` drops), capacity
(requests beyond `max_running` wait, or are refused with `reject_when_full`), and fault injection. Unit tests and the overhead benchmark
use it; it is never a default engine.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from llmesh.common.errors import DependencyDown, InvalidRequest, OverCapacity
from llmesh.worker.engine import (
    ChoiceDelta,
    EngineLoad,
    GenerationChunk,
    GenerationInput,
    GenerationRequest,
    ModelInfo,
    Sampling,
    TokenLogprob,
    TokenRate,
    check_fits,
    find_model,
)


@dataclass(frozen=True)
class ScriptedSettings:
    """How the double behaves. `tokens_per_second=0` emits as fast as the event loop allows."""

    model: str = "scripted"
    max_model_len: int = 2048
    tokens_per_second: float = 0.0
    vocab_size: int = 32000
    eos_after: int | None = None  # finish with "stop" after this many tokens unless ignore_eos
    max_running: int | None = None  # more concurrent requests than this wait in a queue
    reject_when_full: bool = False  # ...or are refused with OverCapacity, as a full vLLM queue is
    fail_after: int | None = None  # raise DependencyDown after this many tokens (0 = before the first)
    first_token_delay_s: float = 0.0


class ScriptedEngine:
    """Engine test double (see module docstring). Inspect `aborted` and `completed` in tests."""

    def __init__(self, settings: ScriptedSettings | None = None) -> None:
        self.settings = settings or ScriptedSettings()
        self._info = ModelInfo(self.settings.model, self.settings.max_model_len, "scripted")
        self._started = False
        self._running = 0
        self._waiting = 0
        self._slots = asyncio.Semaphore(self.settings.max_running) if self.settings.max_running else None
        self._rate = TokenRate()
        self.aborted: list[str] = []
        self.completed: list[str] = []

    async def start(self) -> None:
        self._started = True

    def models(self) -> list[ModelInfo]:
        return [self._info]

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=self._running,
            waiting=self._waiting,
            kv_cache_usage=0.0,
            output_tokens_per_second=self._rate.rate(),
            prefix_cache_hit_rate=0.0,
        )

    async def shutdown(self) -> None:
        self._started = False

    async def tokenize(
        self, model: str, input: GenerationInput, add_special_tokens: bool = True
    ) -> list[int]:
        find_model(self.models(), model)
        return self._tokens(input)

    async def detokenize(self, model: str, ids: Sequence[int]) -> str:
        find_model(self.models(), model)
        return " ".join(f"tok{i}" for i in ids)

    def _tokens(self, input: GenerationInput) -> list[int]:
        if input.prompt_token_ids is not None:
            return list(input.prompt_token_ids)
        if input.chat is not None:
            text = " ".join(f"{m.role}: {m.content}" for m in input.chat)
        else:
            text = input.prompt or ""
        return [zlib.crc32(w.encode()) % self.settings.vocab_size for w in text.split()]

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self._started:
            raise DependencyDown("the scripted engine is not started; call start() first")
        info = find_model(self.models(), req.model)
        prompt_ids = self._tokens(req.input)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty; send some text")
        max_tokens = check_fits(len(prompt_ids), req.sampling, info)

        queued = False
        if self._slots is not None and self._slots.locked():
            if self.settings.reject_when_full:
                raise OverCapacity("the scripted engine's queue is full; retry shortly", retry_after_s=0.5)
            queued = True
            self._waiting += 1
        finished = False
        acquired = False
        try:
            if self._slots is not None:
                try:
                    await self._slots.acquire()
                    acquired = True
                finally:
                    if queued:
                        self._waiting -= 1
            self._running += 1
            try:
                async for chunk in self._steps(req, len(prompt_ids), max_tokens):
                    finished = chunk.finished
                    yield chunk
            finally:
                self._running -= 1
        finally:
            if acquired and self._slots is not None:
                self._slots.release()
            (self.completed if finished else self.aborted).append(req.request_id)

    async def _steps(
        self, req: GenerationRequest, prompt_tokens: int, max_tokens: int
    ) -> AsyncIterator[GenerationChunk]:
        s, cfg = req.sampling, self.settings
        interval = 1.0 / cfg.tokens_per_second if cfg.tokens_per_second > 0 else 0.0
        texts = ["" for _ in range(s.n)]
        done: list[tuple[str, str | None] | None] = [None] * s.n
        produced = 0
        step = 0
        if cfg.first_token_delay_s:
            await asyncio.sleep(cfg.first_token_delay_s)
        while any(d is None for d in done):
            if cfg.fail_after is not None and step >= cfg.fail_after:
                raise DependencyDown(f"scripted engine failure after {step} tokens (fail_after)")
            await asyncio.sleep(interval)
            deltas = []
            for i in range(s.n):
                if done[i] is not None:
                    continue
                delta, finish = self._next_token(s, step, texts[i], max_tokens)
                texts[i] += delta.text
                produced += len(delta.token_ids)
                done[i] = finish
                reason, stop = finish if finish else (None, None)
                deltas.append(
                    ChoiceDelta(
                        i, delta.text, delta.token_ids, delta.logprobs, finish_reason=reason, stop_reason=stop
                    )
                )
            step += 1
            self._rate.add(sum(len(d.token_ids) for d in deltas))
            yield GenerationChunk(tuple(deltas), prompt_tokens, produced, all(d is not None for d in done))

    def _next_token(
        self, s: Sampling, step: int, text_so_far: str, max_tokens: int
    ) -> tuple[ChoiceDelta, tuple[str, str | None] | None]:
        cfg = self.settings
        token_id = step % cfg.vocab_size
        word = f"tok{step}"
        piece = word if step == 0 else f" {word}"
        count = step + 1
        may_stop = count > (s.min_tokens or 0)
        logprobs: tuple[TokenLogprob, ...] = ()
        if s.logprobs:
            top = tuple(
                TokenLogprob(f"alt{k}", (token_id + k) % cfg.vocab_size, -1.0 - k)
                for k in range(s.top_logprobs or 0)
            )
            logprobs = (TokenLogprob(piece, token_id, -0.5, top),)

        if may_stop and token_id in s.stop_token_ids:
            shown = piece if s.include_stop_str_in_output else ""
            return ChoiceDelta(0, shown, (token_id,), logprobs), ("stop", str(token_id))
        if may_stop:
            full = text_so_far + piece
            for stop in s.stop:
                at = full.find(stop, max(0, len(text_so_far) - len(stop) + 1))
                if at >= 0:
                    end = at + len(stop) if s.include_stop_str_in_output else at
                    return ChoiceDelta(0, full[len(text_so_far) : end], (token_id,), logprobs), ("stop", stop)
        if may_stop and cfg.eos_after is not None and count >= cfg.eos_after and not s.ignore_eos:
            return ChoiceDelta(0, piece, (token_id,), logprobs), ("stop", None)
        if count >= max_tokens:
            return ChoiceDelta(0, piece, (token_id,), logprobs), ("length", None)
        return ChoiceDelta(0, piece, (token_id,), logprobs), None
