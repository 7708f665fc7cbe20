"""The load generator's clients: real network clients, one per kind of endpoint.

Each client is called with a fresh `RequestSample`, sends one streaming request over loopback and
fills in the sample as messages arrive. Errors end up in `sample.error`, never as exceptions, so a
failing server shows as errors in the results instead of aborting the run.

- `OpenAIStreamClient`: OpenAI chat completions over HTTP with `stream=true` (aiohttp, or httpx
  where aiohttp is missing), parsing the server-sent events; for `vllm serve` and for llmesh's
  REST edge (Envoy).
- `GatewayStreamClient`: ModelService.StreamChatCompletion over gRPC (the llmesh gateway).
- `WorkerStreamClient`: WorkerService.Generate over gRPC (a worker called directly).

All three send the same chat (one user message) with the same sampling and `ignore_eos`, so every
request produces exactly `max_tokens` tokens whichever path it takes.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Protocol

import grpc
import httpx
from google.protobuf import struct_pb2

from llmesh.bench.stats import RequestSample
from llmesh.common.v1 import common_pb2
from llmesh.model.v1 import model_service_pb2 as model_pb
from llmesh.model.v1 import model_service_pb2_grpc as model_grpc
from llmesh.worker.v1 import worker_service_pb2 as worker_pb
from llmesh.worker.v1 import worker_service_pb2_grpc as worker_grpc

try:
    import aiohttp

    _AIOHTTP_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError,)
except ImportError:  # httpx is used instead
    _AIOHTTP_ERRORS = ()
# What a failed HTTP request raises: recorded in the sample, never propagated.
_HTTP_ERRORS: tuple[type[BaseException], ...] = (
    httpx.HTTPError,
    *_AIOHTTP_ERRORS,
    ValueError,
    OSError,
    TimeoutError,
)

# Sampling every path sends explicitly, so server-side defaults cannot differ between them.
TEMPERATURE = 1.0
TOP_P = 1.0

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Each channel its own connection: channels to one address otherwise share one subchannel.
    ("grpc.use_local_subchannel_pool", 1),
]
# Streams per gRPC connection. Python gRPC serializes a connection's work: 16 streams on one
# connection measured 13-18 % fewer tokens/s and a ~4x TTFT p99 against the same worker than 16
# connections, a cost of the load generator, not of the server under test. The HTTP client opens
# one connection per stream.
STREAMS_PER_CHANNEL = 1
MAX_CHANNELS = 64


class _Channels:
    """A few channels to one address, handed out round-robin, one stub per channel."""

    def __init__(self, address: str, streams: int, make_stub: Any) -> None:
        count = max(1, min(MAX_CHANNELS, -(-streams // STREAMS_PER_CHANNEL)))
        self._channels = [grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS) for _ in range(count)]
        self._stubs = [make_stub(c) for c in self._channels]
        self._next = 0

    def stub(self) -> Any:
        stub = self._stubs[self._next]
        self._next = (self._next + 1) % len(self._stubs)
        return stub

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


class StreamClient(Protocol):
    """One streaming request per call; fills in `sample`."""

    name: str

    async def __call__(self, sample: RequestSample) -> None: ...

    async def aclose(self) -> None: ...


def _rpc_error(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {(error.details() or '')[:200]}"


def http_backend(preferred: str = "auto") -> str:
    """The HTTP client library to drive OpenAI endpoints with: aiohttp when installed (vLLM's own
    serving benchmark uses it), else httpx. httpx 0.28 / httpcore 1.0 stalled up to ~1 s before
    sending requests on reused connections to Envoy at 64 streams, which aiohttp does not."""
    if preferred != "auto":
        return preferred
    return "aiohttp" if _AIOHTTP_ERRORS else "httpx"


class OpenAIStreamClient:
    """OpenAI `POST /v1/chat/completions` with `stream: true`, read as server-sent events."""

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt: str,
        max_tokens: int,
        *,
        connections: int,
        timeout_s: float,
        name: str = "openai-http",
        backend: str = "auto",
    ) -> None:
        self.name = name
        self.backend = http_backend(backend)
        self._url = base_url.rstrip("/") + "/v1/chat/completions"
        self._connections = connections
        self._timeout_s = timeout_s
        self._session: Any = None
        self._body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": TEMPERATURE,
                "top_p": TOP_P,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        self._headers = {"content-type": "application/json", "accept": "text/event-stream"}

    def _open(self) -> Any:
        # Created on first use: aiohttp sessions belong to the running event loop.
        if self._session is None:
            if self.backend == "aiohttp":
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=self._connections),
                    timeout=aiohttp.ClientTimeout(total=self._timeout_s, connect=10.0),
                )
            else:
                self._session = httpx.AsyncClient(
                    limits=httpx.Limits(
                        max_connections=self._connections, max_keepalive_connections=self._connections
                    ),
                    timeout=httpx.Timeout(self._timeout_s, connect=10.0),
                )
        return self._session

    async def __call__(self, sample: RequestSample) -> None:
        session = self._open()
        try:
            if self.backend == "aiohttp":
                await self._call_aiohttp(session, sample)
            else:
                await self._call_httpx(session, sample)
        except _HTTP_ERRORS as error:
            sample.error = f"{type(error).__name__}: {error}"[:300]

    async def _call_aiohttp(self, session: Any, sample: RequestSample) -> None:
        async with session.post(self._url, data=self._body, headers=self._headers) as response:
            if response.status != 200:
                body = (await response.read())[:200].decode(errors="replace")
                sample.error = f"HTTP {response.status}: {body}"
                return
            async for raw in response.content:
                if self._on_line(sample, raw.decode()):
                    return

    async def _call_httpx(self, session: Any, sample: RequestSample) -> None:
        async with session.stream("POST", self._url, content=self._body, headers=self._headers) as response:
            if response.status_code != 200:
                body = (await response.aread())[:200].decode(errors="replace")
                sample.error = f"HTTP {response.status_code}: {body}"
                return
            async for line in response.aiter_lines():
                if self._on_line(sample, line):
                    return

    @staticmethod
    def _on_line(sample: RequestSample, line: str) -> bool:
        """Handle one SSE line; True when the stream is over (done or failed)."""
        if not line.startswith("data:"):
            return False
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        now = time.perf_counter()
        chunk = json.loads(data)
        if chunk.get("error"):
            sample.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
            return True
        if chunk.get("choices"):
            sample.messages += 1
            if sample.first is None:
                sample.first = now
            sample.last = now
        usage = chunk.get("usage")
        if usage:
            sample.tokens = int(usage.get("completion_tokens", usage.get("completionTokens", 0)))
        return False

    async def aclose(self) -> None:
        if self._session is None:
            return
        if self.backend == "aiohttp":
            await self._session.close()
        else:
            await self._session.aclose()
        self._session = None


class GatewayStreamClient:
    """ModelService.StreamChatCompletion over gRPC channels sized for `streams` concurrent streams."""

    def __init__(
        self,
        address: str,
        model: str,
        prompt: str,
        max_tokens: int,
        *,
        timeout_s: float,
        streams: int = 1,
        name: str = "gateway",
    ) -> None:
        self.name = name
        self._channels = _Channels(address, streams, model_grpc.ModelServiceStub)
        self._timeout_s = timeout_s
        self._request = model_pb.CreateChatCompletionRequest(
            model=model,
            messages=[model_pb.ChatMessage(role="user", content=struct_pb2.Value(string_value=prompt))],
            max_tokens=max_tokens,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            ignore_eos=True,
            stream=True,
            stream_options=model_pb.StreamOptions(include_usage=True),
        )

    async def __call__(self, sample: RequestSample) -> None:
        try:
            async for chunk in self._channels.stub().StreamChatCompletion(
                self._request, timeout=self._timeout_s
            ):
                now = time.perf_counter()
                if chunk.HasField("error"):
                    sample.error = f"stream error: {chunk.error.code}: {chunk.error.message[:200]}"
                    return
                if chunk.choices:
                    sample.messages += 1
                    if sample.first is None:
                        sample.first = now
                    sample.last = now
                if chunk.HasField("usage"):
                    sample.tokens = chunk.usage.completion_tokens
        except grpc.aio.AioRpcError as error:
            sample.error = _rpc_error(error)

    async def aclose(self) -> None:
        await self._channels.close()


class WorkerStreamClient:
    """WorkerService.Generate over gRPC channels sized for `streams`, a fresh request id per request."""

    def __init__(
        self,
        address: str,
        model: str,
        prompt: str,
        max_tokens: int,
        *,
        timeout_s: float,
        streams: int = 1,
        name: str = "worker",
    ) -> None:
        self.name = name
        self._channels = _Channels(address, streams, worker_grpc.WorkerServiceStub)
        self._timeout_s = timeout_s
        self._template = worker_pb.GenerateRequest(
            model=model,
            chat=worker_pb.ChatInput(
                messages=[common_pb2.ChatTurn(role="user", content=prompt)], add_generation_prompt=True
            ),
            sampling=common_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=TEMPERATURE, top_p=TOP_P, ignore_eos=True
            ),
        )

    async def __call__(self, sample: RequestSample) -> None:
        request = worker_pb.GenerateRequest()
        request.CopyFrom(self._template)
        request.request_id = uuid.uuid4().hex
        try:
            async for message in self._channels.stub().Generate(
                request, timeout=self._timeout_s, metadata=(("x-request-id", request.request_id),)
            ):
                now = time.perf_counter()
                if any(c.token_ids for c in message.choices):
                    sample.messages += 1
                    if sample.first is None:
                        sample.first = now
                    sample.last = now
                if message.HasField("usage"):
                    sample.tokens = message.usage.completion_tokens
        except grpc.aio.AioRpcError as error:
            sample.error = _rpc_error(error)

    async def aclose(self) -> None:
        await self._channels.close()
