"""AnthropicEngine: the engine interface on Anthropic's Messages API, with the official SDK.

OpenAI-shaped requests map onto the Messages API like this:
- system messages (any number, anywhere) join into the top-level `system` prompt;
- user and assistant turns become `messages`, consecutive turns of one role merged into one;
- a plain text prompt (the completions API) becomes one user turn; token ids cannot be sent;
- max_tokens (required by Anthropic: the model's max_output_tokens when the caller sets none),
  temperature, top_p, top_k and stop (as `stop_sequences`) pass through (the sampling three as
  extra body fields: SDK 2.x dropped them as arguments, older models still take them); other
  sampling parameters are refused with InvalidRequest rather than silently dropped.

Stream events map back: `content_block_delta` text → deltas; `message_start` gives the input
tokens, `message_delta` the output tokens and the stop reason (end_turn / stop_sequence → "stop",
with the stop sequence as stop_reason; max_tokens → "length"). The SDK retries (connection errors,
408/409/429/5xx) happen only while it waits for the response head, so never after text has gone
out. Leaving the stream early closes the HTTP response. The key is passed to the SDK, never logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmesh.common.errors import DependencyDown, InvalidRequest, LlmeshError
from llmesh.worker.adapter_kit import ChoiceStream, RequestTracker, refuse_unsupported
from llmesh.worker.engine import (
    EngineLoad,
    GenerationChunk,
    GenerationInput,
    GenerationRequest,
    ModelInfo,
    find_model,
)
from llmesh.worker.upstream_errors import error_detail, error_for_status, retry_after

log = logging.getLogger(__name__)

_SUPPORTED = {"temperature", "top_p", "top_k", "stop", "max_tokens"}
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "stop",
    "pause_turn": "stop",
    "refusal": "stop",
}


@dataclass(frozen=True)
class AnthropicSettings:
    """One model served by Anthropic (or a server speaking its Messages API)."""

    served_name: str
    upstream_model: str  # e.g. "claude-sonnet-4-5"
    base_url: str = ""  # "": Anthropic's own endpoint
    api_key: str = field(default="", repr=False)
    max_model_len: int = 200_000
    max_output_tokens: int = 1024  # Anthropic requires max_tokens; used when a request sets none
    timeout_s: float = 60.0
    max_retries: int = 2


class AnthropicEngine:
    """Relays generation to the Messages API (see module docstring)."""

    def __init__(self, settings: AnthropicSettings) -> None:
        self.settings = settings
        self._client: Any = None
        self._info = ModelInfo(settings.served_name, settings.max_model_len, "anthropic")
        self._tracker = RequestTracker()

    async def start(self) -> None:
        if self._client is not None:
            return
        import anthropic

        s = self.settings
        self._client = anthropic.AsyncAnthropic(
            # The SDK insists on a key at construction; an empty one fails at the upstream with 401,
            # which maps to a clear "check the configured key" error.
            api_key=s.api_key or "unset",
            base_url=s.base_url or None,
            max_retries=s.max_retries,
            timeout=s.timeout_s,
        )
        log.info("anthropic engine for %s relays to %s", s.served_name, s.base_url or "api.anthropic.com")

    def models(self) -> list[ModelInfo]:
        return [self._info]

    def load(self) -> EngineLoad:
        return self._tracker.load()

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def tokenize(
        self, model: str, input: GenerationInput, add_special_tokens: bool = True
    ) -> list[int]:
        find_model(self.models(), model)
        raise InvalidRequest(
            f"model {model!r} is served by Anthropic's Messages API, which does not expose token ids; "
            "tokenize is not available for it"
        )

    async def detokenize(self, model: str, ids: Sequence[int]) -> str:
        find_model(self.models(), model)
        raise InvalidRequest(
            f"model {model!r} is served by Anthropic's Messages API, which does not expose token ids; "
            "detokenize is not available for it"
        )

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        import anthropic

        client = self._require_started()
        find_model(self.models(), req.model)
        refuse_unsupported(req.sampling, "anthropic", _SUPPORTED)
        params = self._params(req)
        with self._tracker.track(req.request_id):
            try:
                events = await client.messages.create(**params, stream=True)
            except anthropic.APIError as e:
                raise self._error(e) from e
            stream = ChoiceStream()
            try:
                async for chunk in self._relay(events, stream):
                    yield chunk
            except anthropic.APIError as e:
                raise self._error(e, streamed=stream.completion_tokens) from e
            finally:
                await events.close()  # on early exit too: closing the response stops the upstream

    def _params(self, req: GenerationRequest) -> dict[str, Any]:
        s, inp = req.sampling, req.input
        params: dict[str, Any] = {
            "model": self.settings.upstream_model,
            "max_tokens": s.max_tokens or self.settings.max_output_tokens,
        }
        if inp.prompt_token_ids is not None:
            raise InvalidRequest("the anthropic engine takes text or chat messages, not prompt token ids")
        if inp.chat is None:
            params["messages"] = [{"role": "user", "content": inp.prompt or ""}]
        else:
            system, messages = _split_chat(inp)
            params["messages"] = messages
            if system:
                params["system"] = system
        # This SDK no longer has sampling arguments (current models fix them), so they travel as
        # extra body fields, only when the caller set them: a model that refuses them answers 400,
        # which reaches the caller as InvalidRequest with Anthropic's own message.
        sampling = {n: getattr(s, n) for n in ("temperature", "top_p", "top_k") if getattr(s, n) is not None}
        if sampling:
            params["extra_body"] = sampling
        if s.stop:
            params["stop_sequences"] = list(s.stop)
        return params

    async def _relay(self, events: Any, stream: ChoiceStream) -> AsyncIterator[GenerationChunk]:
        input_tokens = output_tokens = 0
        finish: tuple[str, str | None] | None = None
        async for event in events:
            kind = event.type
            if kind == "message_start":
                usage = event.message.usage
                input_tokens = _input_tokens(usage)
                output_tokens = int(usage.output_tokens or 0)
                stream.prompt_tokens = input_tokens
            elif kind == "content_block_delta" and event.delta.type == "text_delta" and event.delta.text:
                yield stream.chunk([stream.piece(0, event.delta.text)])
            elif kind == "message_delta":
                if event.usage is not None:
                    output_tokens = int(event.usage.output_tokens or output_tokens)
                    input_tokens = _input_tokens(event.usage) or input_tokens
                if event.delta.stop_reason:
                    finish = (_FINISH.get(event.delta.stop_reason, "stop"), event.delta.stop_sequence)
            elif kind == "message_stop":
                break
        if finish is None:
            raise DependencyDown(
                f"{self._upstream()} ended the stream without a stop reason after "
                f"{stream.completion_tokens} text deltas"
            )
        stream.piece(0, "", tokens=0, finish_reason=finish[0], stop_reason=finish[1])
        yield stream.final(prompt_tokens=input_tokens, completion_tokens=output_tokens)

    def _error(self, e: Exception, streamed: int | None = None) -> LlmeshError:
        """The domain error for an SDK error: before the stream (`streamed` None) or after
        `streamed` text deltas, where even an HTTP-shaped error is the upstream failing."""
        import anthropic

        body = getattr(e, "body", None)
        detail = error_detail(json.dumps(body)) if isinstance(body, dict) else str(e)
        if streamed is None and isinstance(e, anthropic.APIStatusError):
            return error_for_status(
                e.status_code,
                detail,
                upstream=self._upstream(),
                model=self.settings.served_name,
                retry_after_s=retry_after(e.response.headers),
            )
        if streamed is None:  # APIConnectionError, timeouts included
            return DependencyDown(f"{self._upstream()} is unreachable: {type(e).__name__}: {detail}")
        # An `error` event mid-stream (e.g. overloaded_error), or the connection breaking.
        return DependencyDown(f"{self._upstream()} failed after {streamed} text deltas: {detail}")

    def _upstream(self) -> str:
        return f"the Anthropic upstream of {self.settings.served_name!r}"

    def _require_started(self) -> Any:
        if self._client is None:
            raise DependencyDown(
                f"the anthropic engine for {self._info.name!r} is not started (or shut down)"
            )
        return self._client


def _split_chat(inp: GenerationInput) -> tuple[str, list[dict[str, str]]]:
    """(system prompt, alternating user/assistant turns) from OpenAI-shaped messages."""
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for m in inp.chat or ():
        if m.role in ("system", "developer"):
            system.append(m.content)
            continue
        if m.role not in ("user", "assistant"):
            raise InvalidRequest(
                f"the anthropic engine relays system, user and assistant messages; got role {m.role!r}"
            )
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] += "\n\n" + m.content
        else:
            turns.append({"role": m.role, "content": m.content})
    if not turns:
        raise InvalidRequest("the chat has only system messages; add a user message")
    return "\n\n".join(system), turns


def _input_tokens(usage: Any) -> int:
    # With prompt caching, Anthropic splits the prompt into uncached, cache-write and cache-read parts.
    return sum(
        int(getattr(usage, name, 0) or 0)
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
