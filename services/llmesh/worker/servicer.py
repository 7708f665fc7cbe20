"""WorkerService: the worker's internal control API (load, describe, drain) and raw engine stream."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import cast

from grpc import aio

from llmesh.worker import convert
from llmesh.worker.activity import Activity
from llmesh.worker.engine import Engine, GenerationChunk, find_model
from llmesh.worker.model_servicer import platform_request_id
from llmesh.worker.v1 import worker_service_pb2 as pb
from llmesh.worker.v1 import worker_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    """Internal control of one engine. A cancelled Generate call aborts the engine request."""

    def __init__(
        self,
        engine: Engine,
        activity: Activity,
        *,
        max_num_seqs: int,
        labels: Mapping[str, str] | None = None,
        on_drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._engine = engine
        self._activity = activity
        self._worker_id = activity.worker_id
        self._max_num_seqs = max_num_seqs
        self._labels = dict(labels or {})
        self._on_drain = on_drain

    @property
    def draining(self) -> bool:
        return self._activity.draining

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream the engine's deltas; the last message carries usage and finish reasons.

        The raw engine stream for internal callers; clients use ModelService's RPCs.
        """
        gen_request = convert.request_from_proto(request, platform_request_id(context))
        started = time.monotonic()
        first = True
        finished: set[int] = set()  # a choice's finish_reason goes out once (n > 1 repeats it)
        with self._activity.request():
            try:
                engine_stream = cast(
                    AsyncGenerator[GenerationChunk, None], self._engine.generate(gen_request)
                )
                async with contextlib.aclosing(engine_stream) as stream:
                    async for chunk in stream:
                        message = convert.chunk_to_proto(gen_request.request_id, chunk, first, finished)
                        first = False
                        if message.choices or message.HasField("usage"):
                            yield message
            finally:
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
        """Refuse new work (health NOT_SERVING, out of the pool) and wait for running requests."""
        self._activity.draining = True
        if self._on_drain is not None:
            await self._on_drain()
        remaining = await self._activity.wait_idle(request.timeout_seconds or None)
        return pb.DrainResponse(remaining_requests=remaining)
