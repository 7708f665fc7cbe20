"""The native gRPC load client: ModelService.StreamChatCompletion, closed loop at a fixed concurrency.

It plays the part vLLM's client plays for the OpenAI-API targets, with the same load (the prompts of
vLLM's random dataset, same seed; `max_tokens` with `ignore_eos`; temperature 1, top_p 1; at most
`concurrency` requests in flight, the next one sent as one ends) and the same measurements
(`llmesh.bench.stats`). Errors are recorded in the sample, never raised: a failing server shows as
failed requests.

One channel (one HTTP/2 connection) per concurrent stream, like vLLM's client's one HTTP connection
per stream: Python gRPC serializes a connection's work, and 16 streams on one connection measured
13-18 % fewer tokens/s and a ~4x TTFT p99 against the same server, a cost of the client, not of the
server under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2

from llmesh.bench.stats import RequestSample
from llmesh.model.v1 import model_service_pb2 as model_pb
from llmesh.model.v1 import model_service_pb2_grpc as model_grpc

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Each channel its own connection: channels to one address otherwise share one subchannel.
    ("grpc.use_local_subchannel_pool", 1),
]
MAX_CHANNELS = 64


class ModelStreamClient:
    """StreamChatCompletion over `streams` channels to one address (Envoy, or a worker directly)."""

    def __init__(
        self,
        address: str,
        model: str,
        max_tokens: int,
        *,
        streams: int = 1,
        timeout_s: float = 300.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> None:
        self.address = address
        self._channels = [
            grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            for _ in range(max(1, min(MAX_CHANNELS, streams)))
        ]
        self._stubs = [model_grpc.ModelServiceStub(c) for c in self._channels]
        self._next = 0
        self._timeout_s = timeout_s
        self._model = model
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._top_p = top_p

    def request(self, prompt: str) -> model_pb.CreateChatCompletionRequest:
        return model_pb.CreateChatCompletionRequest(
            model=self._model,
            messages=[model_pb.ChatMessage(role="user", content=struct_pb2.Value(string_value=prompt))],
            max_tokens=self._max_tokens,
            temperature=self._temperature,
            top_p=self._top_p,
            ignore_eos=True,
            stream=True,
            stream_options=model_pb.StreamOptions(include_usage=True),
        )

    async def __call__(self, sample: RequestSample, request: model_pb.CreateChatCompletionRequest) -> None:
        stub = self._stubs[self._next]
        self._next = (self._next + 1) % len(self._stubs)
        try:
            async for chunk in stub.StreamChatCompletion(request, timeout=self._timeout_s):
                if chunk.choices:
                    sample.chunks.append(time.perf_counter())
                if chunk.HasField("usage"):
                    sample.tokens = chunk.usage.completion_tokens
        except grpc.aio.AioRpcError as error:
            sample.error = f"{error.code().name}: {(error.details() or '')[:200]}"

    async def aclose(self) -> None:
        for channel in self._channels:
            await channel.close(None)


@dataclass
class LevelRun:
    concurrency: int
    samples: list[RequestSample]
    duration_s: float  # first send → last completion


async def run_level(
    client: ModelStreamClient, prompts: Sequence[str], concurrency: int, *, time_limit_s: float = 1800.0
) -> LevelRun:
    """Send one request per prompt, at most `concurrency` at a time (as vLLM's client with
    `--max-concurrency` and an infinite request rate)."""
    requests = [client.request(p) for p in prompts]
    samples: list[RequestSample] = []
    cursor = 0
    began = time.perf_counter()

    async def lane() -> None:
        nonlocal cursor
        while cursor < len(requests):
            request = requests[cursor]
            cursor += 1
            sample = RequestSample(sent=time.perf_counter())
            samples.append(sample)
            try:
                await client(sample, request)
            except asyncio.CancelledError:
                sample.error = sample.error or "cancelled: the level ran past its time limit"
                raise
            except Exception as error:  # a client bug must not abort the run
                sample.error = f"{type(error).__name__}: {error}"[:300]

    lanes = [asyncio.create_task(lane()) for _ in range(max(1, min(concurrency, len(requests))))]
    _, pending = await asyncio.wait(lanes, timeout=time_limit_s)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return LevelRun(concurrency, samples, time.perf_counter() - began)


async def wait_until_serving(
    client: ModelStreamClient, prompt: str, timeout_s: float = 120.0, interval_s: float = 0.5
) -> str | None:
    """Single requests until one succeeds (the worker may still be joining); the last error if none did."""
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        sample = RequestSample(sent=time.perf_counter())
        await client(sample, client.request(prompt))
        if sample.ok:
            return None
        last = sample.error or "no output"
        await asyncio.sleep(interval_s)
    return last
