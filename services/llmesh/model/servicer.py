"""ModelService: the public, OpenAI-shaped inference API (the gateway)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from llmesh.common.errors import InvalidRequest, LlmeshError
from llmesh.common.interceptors import status_for
from llmesh.common.logs import request_id_var
from llmesh.model import openai_responses as out
from llmesh.model.catalog import ModelCatalog, limits_of
from llmesh.model.dispatch import Dispatcher, StreamStats
from llmesh.model.openai_requests import PreparedRequest, prepare_chat, prepare_completion
from llmesh.model.openai_responses import Chunker, ChunkT
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.registry.v1 import registry_service_pb2 as registry_pb
from llmesh.scheduler.v1 import scheduler_service_pb2 as sched_pb
from llmesh.worker.v1 import worker_service_pb2 as worker_pb

log = logging.getLogger(__name__)


def _card(model: registry_pb.Model) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.created_at.seconds),
        "owned_by": model.owned_by or "llmesh",
        "max_model_len": model.engine.max_model_len,
        "aliases": list(model.aliases),
        "ready_workers": model.ready_workers,
    }


def _stream_error(error: LlmeshError) -> pb.StreamError:
    code = status_for(error)
    kind = "invalid_request_error" if code.name in {"INVALID_ARGUMENT", "NOT_FOUND"} else "server_error"
    return pb.StreamError(message=error.message, type=kind, code=code.name)


def _new_request_id() -> str:
    return request_id_var.get() or uuid.uuid4().hex


class ModelServicer(pb_grpc.ModelServiceServicer):
    """Lists models and runs chat/text completions on leased workers, streaming tokens straight through."""

    def __init__(self, catalog: ModelCatalog, dispatcher: Dispatcher) -> None:
        self._catalog = catalog
        self._dispatcher = dispatcher

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """OpenAI `GET /v1/models`."""
        models = await self._catalog.list()
        return pb.ListModelsResponse(object="list", data=[pb.ModelCard(**_card(m)) for m in models])

    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext
    ) -> pb.GetModelResponse:
        """OpenAI `GET /v1/models/{model}`."""
        return pb.GetModelResponse(**_card(await self._catalog.resolve(request.model)))

    async def _run(
        self, prepared: PreparedRequest, model: str, context: aio.ServicerContext, stats: StreamStats
    ) -> AsyncIterator[worker_pb.GenerateResponse]:
        demand = sched_pb.AcquireRequest(
            request_id=prepared.generate.request_id,
            model=model,
            priority=prepared.priority,  # type: ignore[arg-type]
            prompt_tokens=prepared.prompt_estimate,
            max_tokens=prepared.max_tokens,
        )
        async for message in self._dispatcher.stream(
            prepared.generate, demand, stats, context.time_remaining()
        ):
            yield message

    async def _collect(
        self, prepared: PreparedRequest, model: str, context: aio.ServicerContext
    ) -> tuple[out.ResponseAccumulator, StreamStats]:
        """Run a generation to the end, for the unary RPCs."""
        stats, acc = StreamStats(), out.ResponseAccumulator()
        async for message in self._run(prepared, model, context, stats):
            acc.add(message)
        return acc, stats

    async def _chunks(
        self, prepared: PreparedRequest, model: str, context: aio.ServicerContext, chunker: Chunker[ChunkT]
    ) -> AsyncIterator[ChunkT]:
        """Each worker message as one chunk; a failure after the first chunk ends with an error chunk."""
        stats, sent = StreamStats(), False
        try:
            async for message in self._run(prepared, model, context, stats):
                if message.choices:
                    sent = True
                    yield chunker.chunk(message)
        except LlmeshError as error:
            if not sent:
                raise
            # HTTP/1.1 clients never see trailers: tell them in the stream, then end with the status.
            yield chunker.error_chunk(_stream_error(error))
            raise
        if prepared.include_usage:
            yield chunker.usage_chunk(out.usage_of(stats.prompt_tokens, stats.completion_tokens))

    async def CreateChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: aio.ServicerContext
    ) -> pb.CreateChatCompletionResponse:
        """A whole chat completion (OpenAI stream=false)."""
        model = await self._catalog.resolve(request.model)
        rid = _new_request_id()
        acc, stats = await self._collect(prepare_chat(request, limits_of(model), rid), model.name, context)
        return pb.CreateChatCompletionResponse(
            id=f"chatcmpl-{rid}",
            object="chat.completion",
            created=int(time.time()),
            model=model.name,
            choices=acc.chat_choices(),
            usage=out.usage_of(stats.prompt_tokens, stats.completion_tokens),
        )

    async def StreamChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        """A chat completion streamed as chunks; a failure after the first chunk ends with an error chunk."""
        model = await self._catalog.resolve(request.model)
        rid = _new_request_id()
        prepared = prepare_chat(request, limits_of(model), rid)
        chunker = out.ChatChunker(f"chatcmpl-{rid}", model.name)
        async for chunk in self._chunks(prepared, model.name, context, chunker):
            yield chunk

    async def CreateCompletion(
        self, request: pb.CreateCompletionRequest, context: aio.ServicerContext
    ) -> pb.CreateCompletionResponse:
        """A whole text completion (OpenAI stream=false)."""
        model = await self._catalog.resolve(request.model)
        rid = _new_request_id()
        prepared = prepare_completion(request, limits_of(model), rid)
        acc, stats = await self._collect(prepared, model.name, context)
        return pb.CreateCompletionResponse(
            id=f"cmpl-{rid}",
            object="text_completion",
            created=int(time.time()),
            model=model.name,
            choices=acc.completion_choices(prepared.echo_text),
            usage=out.usage_of(stats.prompt_tokens, stats.completion_tokens),
        )

    async def StreamCompletion(
        self, request: pb.CreateCompletionRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.StreamCompletionResponse]:
        """A text completion streamed as chunks."""
        model = await self._catalog.resolve(request.model)
        rid = _new_request_id()
        prepared = prepare_completion(request, limits_of(model), rid)
        chunker = out.CompletionChunker(f"cmpl-{rid}", model.name, prepared.echo_text)
        async for chunk in self._chunks(prepared, model.name, context, chunker):
            yield chunk

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """Tokenize text, or a chat rendered with the model's template, on a worker serving the model."""
        model = await self._catalog.resolve(request.model)
        worker_request = worker_pb.TokenizeRequest(
            model=model.name,
            add_special_tokens=request.add_special_tokens if request.HasField("add_special_tokens") else True,
        )
        if request.messages and request.prompt:
            raise InvalidRequest("send either prompt or messages, not both")
        if request.messages:
            chat = prepare_chat(
                pb.CreateChatCompletionRequest(model=model.name, messages=request.messages),
                limits_of(model),
                _new_request_id(),
            ).generate.chat
            worker_request.chat.CopyFrom(chat)
        elif request.prompt:
            worker_request.text = request.prompt
        else:
            raise InvalidRequest("nothing to tokenize: set prompt or messages")
        demand = sched_pb.AcquireRequest(request_id=_new_request_id(), model=model.name)
        reply = await self._dispatcher.call_worker(
            demand, lambda worker: worker.Tokenize(worker_request, timeout=30), context.time_remaining()
        )
        return pb.TokenizeResponse(
            tokens=reply.token_ids, count=reply.count, max_model_len=reply.max_model_len
        )

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        """Turn token ids back into text."""
        model = await self._catalog.resolve(request.model)
        worker_request = worker_pb.DetokenizeRequest(model=model.name, token_ids=request.tokens)
        demand = sched_pb.AcquireRequest(request_id=_new_request_id(), model=model.name)
        reply = await self._dispatcher.call_worker(
            demand, lambda worker: worker.Detokenize(worker_request, timeout=30), context.time_remaining()
        )
        return pb.DetokenizeResponse(prompt=reply.text)

    async def ListScenarios(
        self, request: pb.ListScenariosRequest, context: aio.ServicerContext
    ) -> pb.ListScenariosResponse:
        """Scenario templates of one model, or of all."""
        models = [await self._catalog.resolve(request.model)] if request.model else await self._catalog.list()
        return pb.ListScenariosResponse(
            scenarios=[
                pb.Scenario(
                    name=t.name, model=m.name, system_prompt=t.system_prompt, user_template=t.user_template
                )
                for m in models
                for t in m.templates
            ]
        )
