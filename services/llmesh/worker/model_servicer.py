"""ModelService's inference RPCs, served by the worker that runs the model.

Envoy sends each request here after the endpoint picker (SchedulerService, ext_proc) chose this
worker, and relays the stream to the client itself: no Python hop sits between the engine and
Envoy. The OpenAI request mapping and chunk building are llmesh.model's (one copy).

Every inference response ends with trailers the picker reads — usage and this worker's id — so
it can release the lease and account for the request without touching a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

from grpc import aio

from llmesh.common import headers
from llmesh.common.errors import InvalidRequest, LlmeshError, NotFound
from llmesh.common.interceptors import status_for
from llmesh.model import openai_responses as out
from llmesh.model.openai_requests import (
    ModelLimits,
    PreparedRequest,
    prepare_chat,
    prepare_completion,
    prepare_embeddings,
)
from llmesh.model.openai_responses import Chunker, ChunkT
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.worker import convert
from llmesh.worker.activity import Activity
from llmesh.worker.embedding import Embedder
from llmesh.worker.engine import ChoiceDelta, Engine, GenerationChunk, GenerationInput, ToolCalling
from llmesh.worker.lease_reporter import LeaseReporter
from llmesh.worker.metrics import InferenceMetrics

log = logging.getLogger(__name__)


class _Usage:
    """Tokens a generation produced so far (exact once the engine's last chunk arrived)."""

    __slots__ = ("completion", "prompt", "timing")

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0
        # (time to first chunk, first to last chunk) in seconds, once the generation ended.
        self.timing: tuple[float, float] | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.prompt = chunk.prompt_tokens
        self.completion = chunk.completion_tokens


def stream_error(error: LlmeshError) -> pb.StreamError:
    """A failure after the first chunk, as the error object the last SSE chunk carries."""
    code = status_for(error)
    kind = "invalid_request_error" if code.name in {"INVALID_ARGUMENT", "NOT_FOUND"} else "server_error"
    return pb.StreamError(message=error.message, type=kind, code=code.name)


def platform_request_id(context: aio.ServicerContext) -> str:
    """The id the platform minted for this request (picker or auth), or a fresh one when the
    worker is called directly. Never the client's x-request-id: two clients may send the same."""
    return headers.header(context.invocation_metadata(), headers.REQUEST_ID) or uuid.uuid4().hex


class WorkerModelServicer(pb_grpc.ModelServiceServicer):
    """Chat and text completions (unary and streaming) and tokenization for the worker's model.

    Catalog reads (ListModels, GetModel, ListScenarios) are the registry's; Envoy routes them there.
    """

    def __init__(
        self,
        engine: Engine,
        limits: ModelLimits,
        activity: Activity,
        aliases: tuple[str, ...] = (),
        leases: LeaseReporter | None = None,
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._activity = activity
        self._names = frozenset((limits.name, *aliases))
        self._leases = leases
        self._metrics = InferenceMetrics(limits.name, activity.worker_id, engine)

    def _report_cancel(self, context: aio.ServicerContext, usage: _Usage) -> None:
        """The client went away: tell the scheduler what this stream produced (no trailers reach it)."""
        lease_id = headers.header(context.invocation_metadata(), headers.LEASE_ID)
        if self._leases is not None and lease_id:
            self._leases.cancelled(lease_id, usage.prompt, usage.completion)

    def _model(self, requested: str, context: aio.ServicerContext) -> str:
        """The served model's name; the picker's resolution of an alias wins over the body."""
        resolved = headers.header(context.invocation_metadata(), headers.MODEL)
        name = resolved or requested
        if not name:
            raise InvalidRequest("model is required; list the served models with GET /v1/models (ListModels)")
        if name not in self._names:
            raise NotFound(
                f"model {name!r} is not served by worker {self._activity.worker_id} (it serves "
                f"{self._limits.name!r}); list the served models with GET /v1/models"
            )
        return self._limits.name

    async def _generate(self, prepared: PreparedRequest, usage: _Usage) -> AsyncIterator[list[ChoiceDelta]]:
        """The engine's deltas, a choice's end reported once; usage kept current in `usage`."""
        request = convert.request_from_proto(prepared.generate, prepared.generate.request_id)
        tools = prepared.chat_tools
        if tools is not None:
            uses_tools = tools.choice is not None or any(calls or call_id for calls, call_id in tools.turns)
            if uses_tools and not isinstance(self._engine, ToolCalling):
                raise InvalidRequest(
                    f"model {self._limits.name!r} runs on an engine without tool calling (vLLM has it); "
                    "remove tools or set tool_choice 'none'"
                )
            request = convert.with_tools(request, tools.tools, tools.choice, tools.turns)
        finished: set[int] = set()
        clock = self._metrics.stream("chat" if prepared.generate.HasField("chat") else "text_completion")
        error: BaseException | None = None
        stream = cast(AsyncGenerator[GenerationChunk, None], self._engine.generate(request))
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    clock.chunk(chunk)
                    usage.add(chunk)
                    deltas = out.fresh_deltas(chunk, finished)
                    if deltas:
                        yield deltas
        except BaseException as e:
            error = e
            raise
        finally:
            clock.end(usage.prompt, usage.completion, error)
            usage.timing = clock.timing()

    def _trailers(self, context: aio.ServicerContext, usage: _Usage) -> None:
        trailers = [
            (headers.PROMPT_TOKENS, str(usage.prompt)),
            (headers.COMPLETION_TOKENS, str(usage.completion)),
            (headers.WORKER_ID, self._activity.worker_id),
        ]
        if usage.timing is not None:  # the picker's latency summary (GET /v1/monitoring/metrics)
            first, decode = usage.timing
            trailers += [
                (headers.TTFT_US, str(round(first * 1e6))),
                (headers.DECODE_US, str(round(decode * 1e6))),
            ]
        context.set_trailing_metadata(tuple(trailers))

    async def _collect(
        self, prepared: PreparedRequest, context: aio.ServicerContext
    ) -> tuple[out.ResponseAccumulator, _Usage]:
        """Run a generation to the end, for the unary RPCs."""
        usage, acc = _Usage(), out.ResponseAccumulator()
        with self._activity.request():
            try:
                async for deltas in self._generate(prepared, usage):
                    acc.add(deltas)
            except asyncio.CancelledError:
                self._report_cancel(context, usage)
                raise
            finally:
                self._trailers(context, usage)
        return acc, usage

    async def _chunks(
        self, prepared: PreparedRequest, context: aio.ServicerContext, chunker: Chunker[ChunkT]
    ) -> AsyncIterator[ChunkT]:
        """One chunk per engine step; a failure after the first chunk ends with an error chunk."""
        usage, sent = _Usage(), False
        sse = headers.header(context.invocation_metadata(), headers.SSE) == "1"
        with self._activity.request():
            try:
                async for deltas in self._generate(prepared, usage):
                    sent = True
                    yield chunker.chunk(deltas)
                if prepared.include_usage:
                    yield chunker.usage_chunk(out.usage_of(usage.prompt, usage.completion))
            except LlmeshError as error:
                if not sent:
                    raise
                # HTTP/1.1 clients never see trailers: tell them in the stream, then end with the status.
                yield chunker.error_chunk(stream_error(error))
                raise
            except (asyncio.CancelledError, GeneratorExit):
                self._report_cancel(context, usage)
                raise
            finally:
                self._trailers(context, usage)
        if sse:
            yield chunker.done_chunk()

    async def CreateChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: aio.ServicerContext
    ) -> pb.CreateChatCompletionResponse:
        """A whole chat completion (OpenAI stream=false)."""
        model = self._model(request.model, context)
        rid = platform_request_id(context)
        acc, usage = await self._collect(prepare_chat(request, self._limits, rid, streaming=False), context)
        return pb.CreateChatCompletionResponse(
            id=f"chatcmpl-{rid}",
            object="chat.completion",
            created=int(time.time()),
            model=model,
            choices=acc.chat_choices(),
            usage=out.usage_of(usage.prompt, usage.completion),
        )

    async def StreamChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        """A chat completion streamed as chunks; a failure after the first chunk ends with an error chunk."""
        model = self._model(request.model, context)
        rid = platform_request_id(context)
        prepared = prepare_chat(request, self._limits, rid)
        async for chunk in self._chunks(prepared, context, out.ChatChunker(f"chatcmpl-{rid}", model)):
            yield chunk

    async def CreateCompletion(
        self, request: pb.CreateCompletionRequest, context: aio.ServicerContext
    ) -> pb.CreateCompletionResponse:
        """A whole text completion (OpenAI stream=false)."""
        model = self._model(request.model, context)
        rid = platform_request_id(context)
        prepared = prepare_completion(request, self._limits, rid)
        acc, usage = await self._collect(prepared, context)
        return pb.CreateCompletionResponse(
            id=f"cmpl-{rid}",
            object="text_completion",
            created=int(time.time()),
            model=model,
            choices=acc.completion_choices(prepared.echo_text),
            usage=out.usage_of(usage.prompt, usage.completion),
        )

    async def StreamCompletion(
        self, request: pb.CreateCompletionRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.StreamCompletionResponse]:
        """A text completion streamed as chunks."""
        model = self._model(request.model, context)
        rid = platform_request_id(context)
        prepared = prepare_completion(request, self._limits, rid)
        chunker = out.CompletionChunker(f"cmpl-{rid}", model, prepared.echo_text)
        async for chunk in self._chunks(prepared, context, chunker):
            yield chunk

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """Tokenize text, or a chat rendered with the model's template."""
        model = self._model(request.model, context)
        if request.messages and request.prompt:
            raise InvalidRequest("send either prompt or messages, not both")
        if request.messages:
            chat = prepare_chat(
                pb.CreateChatCompletionRequest(model=model, messages=request.messages),
                self._limits,
                platform_request_id(context),
            ).generate.chat
            source: GenerationInput = convert.chat_from_proto(chat)
        elif request.prompt:
            source = GenerationInput.text(request.prompt)
        else:
            raise InvalidRequest("nothing to tokenize: set prompt or messages")
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        with self._activity.request():
            ids = await self._engine.tokenize(model, source, add_special)
        return pb.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self._limits.max_model_len)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        """Turn token ids back into text."""
        model = self._model(request.model, context)
        with self._activity.request():
            text = await self._engine.detokenize(model, request.tokens)
        return pb.DetokenizeResponse(prompt=text)

    async def CreateEmbeddings(
        self, request: pb.CreateEmbeddingsRequest, context: aio.ServicerContext
    ) -> pb.CreateEmbeddingsResponse:
        """Vectors for text or token-id inputs, when this worker's model is an embedding model."""
        model = self._model(request.model, context)
        if not isinstance(self._engine, Embedder):
            raise InvalidRequest(
                f"model {model!r} is a generation model and does not serve embeddings; "
                "send POST /v1/embeddings for an embedding model (GET /v1/models lists the models)"
            )
        prepared = prepare_embeddings(request)
        usage = _Usage()
        with self._activity.request():
            try:
                result = await self._engine.embed(model, prepared.inputs, prepared.dimensions)
                usage.prompt = result.prompt_tokens
                self._metrics.embedded(result.prompt_tokens)
            finally:
                self._trailers(context, usage)
        return out.embeddings_response(model, result.vectors, result.prompt_tokens, prepared.encoding_format)
