"""OpenAIEngine: the engine interface on any OpenAI-compatible HTTP server (`vllm serve`, llama.cpp's
llama-server, TGI's messages API, Ollama, OpenAI itself).

- Chats go to `/chat/completions`, prompts (text or token ids) to `/completions`, always streamed
  (SSE) with `stream_options.include_usage`, so usage comes from the upstream when it reports it.
  When it does not, a local tokenizer (`models[].tokenizer`) counts it; without one, every content
  delta counts as one token (what vLLM and llama.cpp send) and the prompt counts 0.
- One `httpx.AsyncClient` per engine, i.e. per upstream, pools connections for all requests.
- Retries happen only before the answer starts: a refused connection, a timeout waiting for the
  response head, or a 500/502/503/504. Once a 200 stream is open, a failure ends the stream with
  DependencyDown and is never retried, so no text is ever sent twice.
- Leaving the stream early (aclose, cancellation) closes the upstream response, which is how an
  OpenAI-compatible server learns to stop generating.
- The API key travels in the Authorization header only; it is not in any log line or repr.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from llmesh.common.errors import DependencyDown, InvalidRequest
from llmesh.worker.adapter_kit import ChoiceStream, RequestTracker, encode_input, refuse_unsupported
from llmesh.worker.engine import (
    ChoiceDelta,
    EngineLoad,
    GenerationChunk,
    GenerationInput,
    GenerationRequest,
    ModelInfo,
    Sampling,
    check_fits,
    find_model,
)
from llmesh.worker.local_tokenizer import LocalTokenizer
from llmesh.worker.sse import read_events
from llmesh.worker.upstream_errors import RETRYABLE_STATUSES, error_detail, error_for_status, retry_after

log = logging.getLogger(__name__)

# Standard OpenAI parameters, and the ones vLLM and llama.cpp's servers also accept (sent only when
# set, so OpenAI itself never sees them unless a caller asks).
_PASSED = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
)
_SUPPORTED = {*_PASSED, "stop", "max_tokens", "n", "stop_token_ids", "ignore_eos", "structured"}
_FINISH = {
    "stop": "stop",
    "length": "length",
    "content_filter": "stop",
    "tool_calls": "stop",
    "abort": "abort",
}


@dataclass(frozen=True)
class OpenAISettings:
    """One model served by an OpenAI-compatible upstream."""

    served_name: str
    base_url: str  # e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1
    api_key: str = field(default="", repr=False)
    upstream_model: str = ""  # the upstream's name for it; default: served_name
    max_model_len: int = 0  # checked here only with a local tokenizer; 0: unknown
    max_output_tokens: int = 0  # sent when a request sets no max_tokens; 0: the upstream's default
    tokenizer: str = ""  # local tokenizer (directory or hub id); "" = none
    chat_template: str = ""
    timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    max_retries: int = 2
    retry_backoff_s: float = 0.25
    max_connections: int = 100


class OpenAIEngine:
    """Relays generation to an OpenAI-compatible server (see module docstring)."""

    def __init__(self, settings: OpenAISettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not settings.base_url:
            raise InvalidRequest(
                f"model {settings.served_name!r} uses the openai engine but has no base_url; "
                "set models[].base_url (e.g. http://host:8000/v1)"
            )
        self.settings = settings
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._tokenizer: LocalTokenizer | None = None
        self._info = ModelInfo(settings.served_name, settings.max_model_len, "openai")
        self._tracker = RequestTracker()

    async def start(self) -> None:
        if self._client is not None:
            return
        s = self.settings
        if s.tokenizer:
            self._tokenizer = await LocalTokenizer.load(s.tokenizer, s.chat_template or None)
        headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=s.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(s.timeout_s, connect=s.connect_timeout_s),
            limits=httpx.Limits(max_connections=s.max_connections, max_keepalive_connections=20),
            transport=self._transport,
        )
        log.info("openai engine for %s relays to %s", s.served_name, s.base_url)

    def models(self) -> list[ModelInfo]:
        return [self._info]

    def load(self) -> EngineLoad:
        return self._tracker.load()

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # --- tokenizer ------------------------------------------------------------------------------

    async def tokenize(
        self, model: str, input: GenerationInput, add_special_tokens: bool = True
    ) -> list[int]:
        find_model(self.models(), model)
        return await encode_input(input, self._require_tokenizer(model).encode, add_special_tokens)

    async def detokenize(self, model: str, ids: Sequence[int]) -> str:
        find_model(self.models(), model)
        return self._require_tokenizer(model).decode(ids)

    def _require_tokenizer(self, model: str) -> LocalTokenizer:
        if self._tokenizer is None:
            raise InvalidRequest(
                f"model {model!r} is served by an OpenAI-compatible upstream, whose API has no tokenizer; "
                "tokenize is available once the operator sets models[].tokenizer for it"
            )
        return self._tokenizer

    # --- generation -----------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        client = self._require_started()
        info = find_model(self.models(), req.model)
        refuse_unsupported(req.sampling, "openai", _SUPPORTED)
        with self._tracker.track(req.request_id):
            prompt_tokens = 0
            if self._tokenizer is not None:
                prompt_tokens = len(await encode_input(req.input, self._tokenizer.encode, True))
                if info.max_model_len:
                    check_fits(prompt_tokens, req.sampling, info)
            path, body = self._request_body(req)
            stream = ChoiceStream(req.sampling.n, prompt_tokens)
            counted = 0
            async with _Opened(self.settings, self.upstream, client, path, body) as response:
                async for chunk in self._relay(response, stream):
                    self._tracker.rate.add(chunk.completion_tokens - counted)
                    counted = chunk.completion_tokens
                    yield chunk

    def _request_body(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        s, inp = req.sampling, req.input
        body: dict[str, Any] = {
            "model": self.settings.upstream_model or self.settings.served_name,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if inp.chat is not None:
            path = "chat/completions"
            body["messages"] = [
                {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                for m in inp.chat
            ]
        else:
            path = "completions"
            body["prompt"] = list(inp.prompt_token_ids) if inp.prompt_token_ids is not None else inp.prompt
        max_tokens = s.max_tokens or self.settings.max_output_tokens
        if max_tokens:
            body["max_tokens"] = max_tokens
        body.update({name: getattr(s, name) for name in _PASSED if getattr(s, name) is not None})
        if s.stop:
            body["stop"] = list(s.stop)
        if s.n != 1:
            body["n"] = s.n
        if s.stop_token_ids:
            body["stop_token_ids"] = list(s.stop_token_ids)
        if s.ignore_eos:
            body["ignore_eos"] = True
        if s.structured is not None:
            body["response_format"] = _response_format(s)
        return path, body

    async def _relay(self, response: httpx.Response, stream: ChoiceStream) -> AsyncIterator[GenerationChunk]:
        usage: dict[str, Any] | None = None
        done = False
        try:
            async for event in read_events(response.aiter_lines()):
                if event.data.strip() == "[DONE]":
                    done = True
                    break
                payload = _parse(event.data)
                if "error" in payload:
                    raise DependencyDown(
                        f"{self.upstream} failed mid-stream after {stream.completion_tokens} tokens: "
                        f"{error_detail(event.data)}"
                    )
                if payload.get("usage"):
                    usage = payload["usage"]
                deltas = [self._piece(stream, c) for c in payload.get("choices") or ()]
                deltas = [d for d in deltas if d.text or d.finish_reason]
                if deltas:
                    yield stream.chunk(deltas)
        except httpx.HTTPError as e:  # read timeout, connection reset: never retried mid-answer
            raise DependencyDown(
                f"{self.upstream} broke off the stream after {stream.completion_tokens} tokens: "
                f"{type(e).__name__}: {e}"
            ) from e
        if stream.unfinished():
            ended = "ended with [DONE]" if done else "closed the stream"
            raise DependencyDown(f"{self.upstream} {ended} before choices {stream.unfinished()} finished")
        prompt_tokens, completion_tokens = self._usage(usage, stream)
        yield stream.final(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def _piece(self, stream: ChoiceStream, choice: dict[str, Any]) -> ChoiceDelta:
        index = int(choice.get("index", 0))
        delta = choice.get("delta")
        text = (delta.get("content") if isinstance(delta, dict) else choice.get("text")) or ""
        reason = choice.get("finish_reason")
        finish = _FINISH.get(reason, "stop") if reason else None
        stop = choice.get("stop_reason")
        return stream.piece(
            index,
            text,
            tokens=1 if text else 0,
            finish_reason=finish,
            stop_reason=None if stop is None else str(stop),
        )

    def _usage(self, usage: dict[str, Any] | None, stream: ChoiceStream) -> tuple[int | None, int | None]:
        """(prompt, completion) tokens: the upstream's count, else the local tokenizer's, else None
        (the counted deltas stand)."""
        if usage and "completion_tokens" in usage:
            return int(usage.get("prompt_tokens") or 0), int(usage["completion_tokens"])
        if self._tokenizer is not None:
            return None, sum(self._tokenizer.count(t) for t in stream.texts)
        return None, None

    @property
    def upstream(self) -> str:
        """How messages name the upstream (never with its key)."""
        return f"the OpenAI-compatible upstream of {self.settings.served_name!r}"

    def _require_started(self) -> httpx.AsyncClient:
        if self._client is None:
            raise DependencyDown(f"the openai engine for {self._info.name!r} is not started (or shut down)")
        return self._client


class _Opened:
    """`async with`: POST the request and hand over a 200 streaming response, retrying only until
    then; the response is closed on exit, also when the consumer leaves early."""

    def __init__(
        self, settings: OpenAISettings, upstream: str, client: httpx.AsyncClient, path: str, body: Any
    ) -> None:
        self._settings, self._upstream, self._client = settings, upstream, client
        self._path, self._body = path, body
        self._response: httpx.Response | None = None

    async def __aenter__(self) -> httpx.Response:
        s = self._settings
        for attempt in range(s.max_retries + 1):
            last = attempt == s.max_retries
            try:
                request = self._client.build_request("POST", self._path, json=self._body)
                response = await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.PoolTimeout) as e:
                if last:
                    raise DependencyDown(
                        f"{self._upstream} at {s.base_url} is unreachable after "
                        f"{attempt + 1} attempts: {type(e).__name__}: {e}"
                    ) from e
            except httpx.HTTPError as e:
                raise DependencyDown(f"{self._upstream} failed: {type(e).__name__}: {e}") from e
            else:
                if response.status_code == 200:
                    self._response = response
                    return response
                body = await response.aread()
                await response.aclose()
                error = error_for_status(
                    response.status_code,
                    error_detail(body),
                    upstream=self._upstream,
                    model=s.served_name,
                    retry_after_s=retry_after(response.headers),
                )
                if last or response.status_code not in RETRYABLE_STATUSES:
                    raise error
            log.info("upstream attempt %d for %s failed; retrying", attempt + 1, s.served_name)
            await asyncio.sleep(s.retry_backoff_s * (2**attempt))
        raise AssertionError("unreachable")

    async def __aexit__(self, *exc: object) -> None:
        if self._response is not None:
            await self._response.aclose()


def _parse(data: str) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except ValueError as e:
        raise DependencyDown(f"the upstream sent an event that is not JSON: {data[:200]!r}") from e
    if not isinstance(payload, dict):
        raise DependencyDown(f"the upstream sent an unexpected event: {data[:200]!r}")
    return payload


def _response_format(s: Sampling) -> dict[str, Any]:
    spec = s.structured
    assert spec is not None
    if spec.kind == "json_object":
        return {"type": "json_object"}
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.value)
        except ValueError as e:
            raise InvalidRequest(f"the JSON schema is not valid JSON: {e}") from e
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    raise InvalidRequest(
        f"the openai engine relays structured output as a JSON schema or JSON object only; "
        f"{spec.kind!r} is not supported"
    )
