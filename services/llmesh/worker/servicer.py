"""WorkerService: streams an engine's output over gRPC, straight to the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import cast

from grpc import aio

from llmesh.common.errors import DependencyDown
from llmesh.common.logs import request_id_var
from llmesh.worker import convert
from llmesh.worker.engine import Engine, GenerationChunk, find_model
from llmesh.worker.v1 import worker_service_pb2 as pb
from llmesh.worker.v1 import worker_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    """Serves one engine. A cancelled Generate call aborts the engine request."""

    def __init__(
        self,
        engine: Engine,
        worker_id: str,
        *,
        max_num_seqs: int,
        labels: Mapping[str, str] | None = None,
        on_drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._max_num_seqs = max_num_seqs
        self._labels = dict(labels or {})
        self._on_drain = on_drain
        self._draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def draining(self) -> bool:
        return self._draining

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream the engine's deltas; the last message carries usage and finish reasons."""
        if self._draining:
            raise DependencyDown(f"worker {self._worker_id} is draining; retry on another worker")
        gen_request = convert.request_from_proto(request, request_id_var.get())
        self._active += 1
        self._idle.clear()
        started = time.monotonic()
        first = True
        finished: set[int] = set()  # a choice's finish_reason goes out once (n > 1 repeats it)
        try:
            engine_stream = cast(AsyncGenerator[GenerationChunk, None], self._engine.generate(gen_request))
            async with contextlib.aclosing(engine_stream) as stream:
                async for chunk in stream:
                    message = convert.chunk_to_proto(gen_request.request_id, chunk, first, finished)
                    first = False
                    if message.choices or message.HasField("usage"):
                        yield message
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
            log.debug("generate ended", extra={"seconds": round(time.monotonic() - started, 4)})

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """Tokenize text, or a chat after applying the model's template."""
        info = find_model(self._engine.models(), request.model)
        ids = await self._engine.tokenize(
            request.model, convert.input_from_proto(request), request.add_special_tokens
        )
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=info.max_model_len)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        """Decode token ids to text."""
        find_model(self._engine.models(), request.model)
        return pb.DetokenizeResponse(text=await self._engine.detokenize(request.model, request.token_ids))

    async def GetLoad(self, request: pb.GetLoadRequest, context: aio.ServicerContext) -> pb.GetLoadResponse:
        """The engine's current load."""
        return pb.GetLoadResponse(load=convert.load_to_proto(self._engine.load()))

    async def DescribeWorker(
        self, request: pb.DescribeWorkerRequest, context: aio.ServicerContext
    ) -> pb.DescribeWorkerResponse:
        """Models served, capacity and labels."""
        return pb.DescribeWorkerResponse(
            worker_id=self._worker_id,
            models=[
                pb.ServedModel(name=m.name, max_model_len=m.max_model_len, engine=m.engine)
                for m in self._engine.models()
            ],
            max_num_seqs=self._max_num_seqs,
            labels=self._labels,
        )

    async def Drain(self, request: pb.DrainRequest, context: aio.ServicerContext) -> pb.DrainResponse:
        """Refuse new work (health NOT_SERVING) and wait for running requests."""
        self._draining = True
        if self._on_drain is not None:
            await self._on_drain()
        timeout = request.timeout_seconds or None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return pb.DrainResponse(remaining_requests=self._active)
