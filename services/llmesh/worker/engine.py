"""The engine interface of the worker: what a request is, what a stream yields, what an engine does.

Engine-agnostic on purpose: nothing here imports vLLM or torch, so the servicer, the scheduler's
tests and the scripted test double can all use these types without an inference stack installed.

Value objects validate themselves on construction and raise `InvalidRequest` with a message that
says what to fix, so an invalid request never reaches an engine. Checks that need the model
(unknown model name, prompt + max_tokens over the context window) live in the helpers at the end of
this module, which every adapter calls.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llmesh.common.errors import InvalidRequest, NotFound

STRUCTURED_KINDS = frozenset({"json_schema", "regex", "choice", "json_object", "grammar"})
FINISH_REASONS = frozenset({"stop", "length", "abort", "error"})
MAX_TOP_LOGPROBS = 20
MAX_N = 16


@dataclass(frozen=True)
class StructuredSpec:
    """Constrain the output: a JSON schema (as JSON text), a regex, one of `choices`, any JSON
    object, or a grammar (EBNF/Lark text, as the engine's grammar backend accepts)."""

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequest(
                f"structured output kind {self.kind!r} is not supported; "
                f"use one of {sorted(STRUCTURED_KINDS)}"
            )
        if self.kind == "choice":
            if not self.choices or any(not c for c in self.choices):
                raise InvalidRequest("structured output 'choice' needs at least one non-empty choice")
        elif self.kind != "json_object" and not self.value:
            raise InvalidRequest(f"structured output {self.kind!r} needs a non-empty value")


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters. `None` (and the empty tuples) mean "the engine's default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    n: int = 1
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured: StructuredSpec | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, sorted by id

    def __post_init__(self) -> None:
        _check_range("temperature", self.temperature, 0.0, 2.0)
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1]; got {self.top_p}")
        # 0 and -1 both mean "no top-k" (the two conventions clients use).
        if self.top_k is not None and self.top_k < -1:
            raise InvalidRequest(f"top_k must be >= 1, or 0/-1 to disable it; got {self.top_k}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.repetition_penalty is not None and not (
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0
        ):
            raise InvalidRequest(f"repetition_penalty must be > 0 (1 = off); got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")
        if len(self.stop) > 16:
            raise InvalidRequest(f"at most 16 stop strings are allowed; got {len(self.stop)}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be non-negative; got {list(self.stop_token_ids)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1; got {self.max_tokens}")
        if self.min_tokens is not None:
            if self.min_tokens < 0:
                raise InvalidRequest(f"min_tokens must be >= 0; got {self.min_tokens}")
            if self.max_tokens is not None and self.min_tokens > self.max_tokens:
                raise InvalidRequest(
                    f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
                )
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidRequest(
                    f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]; got {self.top_logprobs}"
                )
            if self.top_logprobs > 0 and not self.logprobs:
                raise InvalidRequest("top_logprobs needs logprobs=true")
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be in [1, {MAX_N}]; got {self.n}")
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                raise InvalidRequest(f"logit_bias keys must be non-negative token ids; got {token_id}")
            _check_range(f"logit_bias[{token_id}]", bias, -100.0, 100.0)
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise InvalidRequest(f"seed must fit in 64 bits; got {self.seed}")


def _check_range(name: str, value: float | None, lo: float, hi: float) -> None:
    if value is not None and not (math.isfinite(value) and lo <= value <= hi):
        raise InvalidRequest(f"{name} must be in [{lo:g}, {hi:g}]; got {value}")


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant turn made: its id, the function, the arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of the `index`-th tool call of a choice: id and name come first, arguments in pieces."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class ToolChoice:
    """How a chat with tools is answered: "auto" (the model decides; a tool parser finds the calls),
    "required" (at least one call) or "named" (a call of `function`). `streaming` says whether the
    client reads the answer as it comes, so parsing may wait for the whole text when it does not."""

    mode: str
    function: str = ""
    parallel: bool = True
    streaming: bool = True


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; `role` is free-form (system, user, assistant, tool, ...) as chat templates decide."""

    role: str
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str = ""  # the call a tool turn answers

    def __post_init__(self) -> None:
        if not self.role:
            raise InvalidRequest("every chat message needs a role (system, user, assistant, ...)")


@dataclass(frozen=True)
class GenerationInput:
    """Exactly one of a text prompt, pre-tokenized prompt ids, or chat messages."""

    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    chat: tuple[ChatMessage, ...] | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    tools: tuple[Mapping[str, Any], ...] = ()  # OpenAI tool objects the chat template renders

    def __post_init__(self) -> None:
        given = [n for n in ("prompt", "prompt_token_ids", "chat") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InvalidRequest(
                f"give exactly one of prompt, prompt_token_ids or chat messages; got {given or 'none'}"
            )
        if self.prompt_token_ids is not None:
            if not self.prompt_token_ids:
                raise InvalidRequest("prompt_token_ids is empty; send at least one token id")
            if any(t < 0 for t in self.prompt_token_ids):
                raise InvalidRequest("prompt_token_ids must be non-negative")
        if self.chat is not None and not self.chat:
            raise InvalidRequest("chat has no messages; send at least one message")

    @classmethod
    def text(cls, prompt: str) -> GenerationInput:
        return cls(prompt=prompt)

    @classmethod
    def tokens(cls, ids: Sequence[int]) -> GenerationInput:
        return cls(prompt_token_ids=tuple(ids))

    @classmethod
    def messages(
        cls,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> GenerationInput:
        return cls(
            chat=tuple(messages), add_generation_prompt=add_generation_prompt, chat_template=chat_template
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: its id (unique per engine; used to abort it), the served model, input, sampling."""

    request_id: str
    model: str
    input: GenerationInput
    sampling: Sampling = field(default_factory=Sampling)
    priority: int = 0
    tool_choice: ToolChoice | None = None  # None: the output is text, no tool calls are looked for

    def __post_init__(self) -> None:
        if not self.request_id:
            raise InvalidRequest("request_id must not be empty")
        if not self.model:
            raise InvalidRequest("model must not be empty; name one of the served models")


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability, with the most likely alternatives at that position."""

    token: str
    token_id: int
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice (of `n`) produced since the previous chunk."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "abort" | "error" | None
    stop_reason: str | None = None  # the stop string or stop token id that ended it, if any
    tool_calls: tuple[ToolCallDelta, ...] = ()  # tool-call fragments parsed out of the output


@dataclass(frozen=True)
class GenerationChunk:
    """Tokens the engine produced together. `completion_tokens` is cumulative over all choices.

    The last chunk of a stream has `finished=True` and a finish_reason on every choice: a choice that
    ended in an earlier chunk (n > 1) appears there again with no text and the same finish_reason, so
    a consumer that reports each end once skips choices it has already seen finish.
    """

    choices: tuple[ChoiceDelta, ...]
    prompt_tokens: int
    completion_tokens: int
    finished: bool


@dataclass(frozen=True)
class EngineLoad:
    """A point-in-time load report, sent with worker heartbeats."""

    running: int
    waiting: int
    kv_cache_usage: float  # 0..1
    output_tokens_per_second: float
    prefix_cache_hit_rate: float  # 0..1


@dataclass(frozen=True)
class ModelInfo:
    """A model the engine serves under `name`."""

    name: str
    max_model_len: int
    engine: str


@runtime_checkable
class Engine(Protocol):
    """An inference engine behind the worker.

    `generate` is an async generator. Each chunk carries what the engine produced together; nothing
    is held back. When the consumer stops iterating, the engine request is aborted: at once on
    `aclose()` or task cancellation, so consumers that may `break` early wrap the stream in
    `contextlib.aclosing` (a bare `break` leaves the abort to garbage collection).
    """

    async def start(self) -> None: ...

    def models(self) -> list[ModelInfo]: ...

    def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def tokenize(
        self, model: str, input: GenerationInput, add_special_tokens: bool = True
    ) -> list[int]: ...

    async def detokenize(self, model: str, ids: Sequence[int]) -> str: ...

    def load(self) -> EngineLoad: ...

    async def shutdown(self) -> None: ...


@runtime_checkable
class Supervised(Protocol):
    """An engine whose work runs in processes of its own, which can die while the worker lives on
    (vLLM's engine core). The worker watches it (llmesh.worker.engine_watch)."""

    def failure(self) -> str | None:
        """Why the engine can no longer serve (its process exited), or None while it can."""
        ...


@runtime_checkable
class ToolCalling(Protocol):
    """An engine that renders tools and finds tool calls in its output (GenerationRequest.tool_choice).

    `tool_parser` names the parser for tool_choice "auto"; "" when the model has none."""

    def tool_parser(self) -> str: ...


# --- helpers shared by the adapters -------------------------------------------------------------


def find_model(models: Sequence[ModelInfo], name: str) -> ModelInfo:
    """The served model called `name`, or NotFound listing what is served."""
    for m in models:
        if m.name == name:
            return m
    served = ", ".join(m.name for m in models) or "none"
    raise NotFound(f"model {name!r} is not served by this worker; served models: {served}")


def check_fits(prompt_tokens: int, sampling: Sampling, model: ModelInfo) -> int:
    """Check the prompt and the requested completion fit the context; return the effective max_tokens."""
    room = model.max_model_len - prompt_tokens
    if room < 1:
        raise InvalidRequest(
            f"the prompt has {prompt_tokens} tokens but {model.name!r} holds at most {model.max_model_len} "
            "(prompt + completion); shorten the prompt"
        )
    if sampling.max_tokens is None:
        return room
    if sampling.max_tokens > room:
        raise InvalidRequest(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({sampling.max_tokens}) exceeds the context of "
            f"{model.name!r} ({model.max_model_len} tokens); lower max_tokens to at most {room} "
            "or shorten the prompt"
        )
    return sampling.max_tokens


class TokenRate:
    """Output tokens per second over a sliding window, for load reports."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, tokens: int, now: float | None = None) -> None:
        if tokens <= 0:
            return
        now = time.monotonic() if now is None else now
        self._events.append((now, tokens))
        self._total += tokens
        self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        return self._total / self._window_s

    def _trim(self, now: float) -> None:
        horizon = now - self._window_s
        while self._events and self._events[0][0] < horizon:
            self._total -= self._events.popleft()[1]
