"""LlamaCppEngine: the engine interface on llama.cpp (llama-cpp-python) for GGUF models on CPU.

llama.cpp is synchronous, so generation runs off the event loop, bounded like this:
- `n_parallel` slots, each a `Llama` instance with its own context (KV cache); the weights are
  memory-mapped, so the slots share one copy of them. A request takes a free slot from an
  asyncio.Queue (waiting there, counted as `waiting`, when none is free) and gives it back when its
  thread is done;
- each request's decode loop runs on a dedicated thread pool of `n_parallel` threads and hands
  what it produced to the request's asyncio.Queue with `loop.call_soon_threadsafe`; the stream
  merges whatever is queued into one chunk, so tokens ready together travel together;
- cancellation (aclose, task cancelled) sets a threading.Event the decode loop checks after every
  token: generation stops within one token, then the slot returns to the pool.

Prompts: chats use the configured template, else the GGUF's own, else Gemma's turn format for
Gemma files (see gguf_chat). Text is detokenized incrementally (UTF-8 safe) without special tokens,
so template tokens never reach a client. Usage is exact: the prompt's token count and every
sampled token, the end-of-generation token included (as vLLM counts).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from llmesh.common.errors import DependencyDown, InvalidRequest
from llmesh.worker.adapter_kit import ChoiceStream, RequestTracker, encode_input, refuse_unsupported
from llmesh.worker.engine import (
    EngineLoad,
    GenerationChunk,
    GenerationInput,
    GenerationRequest,
    ModelInfo,
    Sampling,
    check_fits,
    find_model,
)
from llmesh.worker.gguf_chat import ChatFormat, chat_format_for, render_chat
from llmesh.worker.stop_strings import StopMatcher

log = logging.getLogger(__name__)

_SUPPORTED = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "seed",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
}


@dataclass(frozen=True)
class LlamaCppSettings:
    """One GGUF model on llama.cpp."""

    model_path: str  # the .gguf file
    served_name: str
    n_ctx: int = 2048  # context per slot (prompt + completion)
    n_threads: int | None = None  # None: llama.cpp's default
    n_parallel: int = 1  # slots: requests generating at once
    n_batch: int = 512
    max_output_tokens: int = 1024  # when a request sets no max_tokens
    chat_template: str = ""  # overrides the file's
    # Sampling when a request leaves a parameter unset: llama.cpp's own defaults.
    defaults: dict[str, float] = field(
        default_factory=lambda: {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}
    )


@dataclass
class _Piece:
    """What the decode thread hands to the stream: new text and tokens, or the end, or a failure."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish: tuple[str, str | None] | None = None
    error: BaseException | None = None


class LlamaCppEngine:
    """Serves one GGUF model (see module docstring)."""

    def __init__(self, settings: LlamaCppSettings) -> None:
        if settings.n_parallel < 1:
            raise InvalidRequest(f"n_parallel must be >= 1; got {settings.n_parallel}")
        self.settings = settings
        self._slots: list[Any] = []
        self._free: asyncio.Queue[Any] = asyncio.Queue()
        self._threads: ThreadPoolExecutor | None = None
        self._format: ChatFormat | None = None  # set by start()
        self._stop_ids: frozenset[int] = frozenset()
        self._info = ModelInfo(settings.served_name, settings.n_ctx, "llamacpp")
        self._tracker = RequestTracker()
        self._cancels: set[threading.Event] = set()
        self.metadata: dict[str, str] = {}
        self.start_seconds: float | None = None

    async def start(self) -> None:
        if self._slots:
            return
        began = time.monotonic()
        s = self.settings
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise DependencyDown(
                "the llamacpp engine needs llama-cpp-python: pip install 'llmesh[llamacpp]'"
            ) from e

        def load_one() -> Any:
            return Llama(
                model_path=s.model_path,
                n_ctx=s.n_ctx,
                n_threads=s.n_threads,
                n_threads_batch=s.n_threads,
                n_batch=min(s.n_batch, s.n_ctx),
                verbose=False,
            )

        try:
            for _ in range(s.n_parallel):
                self._slots.append(await asyncio.to_thread(load_one))
        except (ValueError, RuntimeError, OSError) as e:
            raise DependencyDown(f"llama.cpp could not load {s.model_path!r}: {e}") from e
        first = self._slots[0]
        self.metadata = dict(first.metadata)
        self._format = chat_format_for(self.metadata, s.chat_template)
        ids = [self._special_id(first, t) for t in self._format.stop_tokens]
        self._stop_ids = frozenset(i for i in ids if i is not None)
        for slot in self._slots:
            self._free.put_nowait(slot)
        self._threads = ThreadPoolExecutor(s.n_parallel, thread_name_prefix="llamacpp")
        self.start_seconds = time.monotonic() - began
        log.info(
            "llama.cpp ready for %s in %.1fs: %d slot(s), chat format %s",
            s.served_name,
            self.start_seconds,
            s.n_parallel,
            self._format.source,
        )

    def models(self) -> list[ModelInfo]:
        return [self._info]

    def load(self) -> EngineLoad:
        return self._tracker.load()

    async def shutdown(self) -> None:
        for cancel in list(self._cancels):
            cancel.set()
        threads, self._threads = self._threads, None
        if threads is not None:
            await asyncio.to_thread(threads.shutdown, wait=True)
        slots, self._slots = self._slots, []
        self._free = asyncio.Queue()
        for slot in slots:
            slot.close()

    # --- tokenizer ------------------------------------------------------------------------------

    async def tokenize(
        self, model: str, input: GenerationInput, add_special_tokens: bool = True
    ) -> list[int]:
        self._require_started()
        find_model(self.models(), model)
        return await self._encode(input, add_special_tokens)

    async def detokenize(self, model: str, ids: Sequence[int]) -> str:
        vocab = self._require_started()
        find_model(self.models(), model)
        top = vocab.n_vocab() - 1
        bad = [i for i in ids if not 0 <= i <= top]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary of {model!r} (0..{top})")
        return bytes(vocab.detokenize(list(ids), special=True)).decode("utf-8", errors="replace")

    async def _encode(self, input: GenerationInput, add_special_tokens: bool = True) -> list[int]:
        return await encode_input(input, self._encode_sync, add_special_tokens)

    def _encode_sync(self, input: GenerationInput, add_special_tokens: bool) -> list[int]:
        # Tokenizing reads the model's vocabulary only, so any slot's instance may do it, even busy.
        vocab = self._slots[0]
        if input.chat is None:
            # A plain prompt is the caller's text: its "<start_of_turn>" is text, not a control token.
            return list(
                vocab.tokenize((input.prompt or "").encode(), add_bos=add_special_tokens, special=False)
            )
        chat_format = self._chat_format(input)
        text = render_chat(
            chat_format.template,
            input.chat,
            add_generation_prompt=input.add_generation_prompt,
            bos_token=self._token_text(vocab, vocab.token_bos()),
            eos_token=self._token_text(vocab, vocab.token_eos()),
        )
        # The template wrote BOS itself; its special tokens are meant as such.
        return list(vocab.tokenize(text.encode(), add_bos=False, special=True))

    def _chat_format(self, input: GenerationInput) -> ChatFormat:
        if input.chat_template:
            return chat_format_for({}, input.chat_template)
        assert self._format is not None
        return self._format

    # --- generation -----------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._require_started()
        info = find_model(self.models(), req.model)
        refuse_unsupported(req.sampling, "llamacpp", _SUPPORTED)
        with self._tracker.track(req.request_id):
            prompt_ids = await self._encode(req.input)
            if not prompt_ids:
                raise InvalidRequest("the prompt is empty after tokenization; send some text")
            max_tokens = check_fits(len(prompt_ids), req.sampling, info)
            if req.sampling.max_tokens is None:
                max_tokens = min(max_tokens, self.settings.max_output_tokens)
            answer_ends = self._chat_format(req.input).stop_texts if req.input.chat is not None else ()
            with self._tracker.queued():
                slot = await self._free.get()
            async for chunk in self._run(slot, req.sampling, prompt_ids, max_tokens, answer_ends):
                yield chunk

    async def _run(
        self, slot: Any, s: Sampling, prompt_ids: list[int], max_tokens: int, answer_ends: tuple[str, ...]
    ) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[_Piece] = asyncio.Queue()
        cancel = threading.Event()
        self._cancels.add(cancel)
        assert self._threads is not None

        def hand_over(piece: _Piece) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        job = loop.run_in_executor(
            self._threads, self._decode, slot, s, prompt_ids, max_tokens, answer_ends, cancel, hand_over
        )
        free = self._free

        def give_back(_: object) -> None:
            self._cancels.discard(cancel)
            free.put_nowait(slot)

        job.add_done_callback(give_back)
        stream = ChoiceStream(1, len(prompt_ids))
        try:
            while True:
                batch = [await pieces.get()]
                while not pieces.empty():
                    batch.append(pieces.get_nowait())
                for piece in batch:
                    if piece.error is not None:
                        raise DependencyDown(f"llama.cpp failed: {piece.error}") from piece.error
                text = "".join(p.text for p in batch)
                ids = tuple(t for p in batch for t in p.token_ids)
                finish = batch[-1].finish
                reason, stop = finish if finish else (None, None)
                delta = stream.piece(
                    0, text, tokens=len(ids), token_ids=ids, finish_reason=reason, stop_reason=stop
                )
                self._tracker.rate.add(len(ids))
                if finish is not None:
                    yield stream.final([delta])
                    return
                yield stream.chunk([delta])
        finally:
            cancel.set()  # a no-op when the decode loop already ended

    def _decode(
        self,
        llm: Any,
        s: Sampling,
        prompt_ids: list[int],
        max_tokens: int,
        answer_ends: tuple[str, ...],
        cancel: threading.Event,
        hand_over: Any,
    ) -> None:
        """The decode loop, on a slot's thread: sample, detokenize, match stops, hand pieces over."""
        try:
            import llama_cpp

            vocab = llm._model.vocab
            llm.set_seed(s.seed if s.seed is not None else random.getrandbits(31))
            # A transcript answer follows "Assistant:"; its first space is the format's, not the answer's.
            leading = bool(answer_ends)
            # ignore_eos runs to max_tokens past every end-of-answer mark, as vLLM runs past the
            # end-of-turn ids of a generation config: the format's stop tokens and texts are the EOS
            # of a chat here. The caller's own stop strings and token ids still apply.
            if s.ignore_eos:
                answer_ends, format_stop_ids = (), frozenset[int]()
            else:
                format_stop_ids = self._stop_ids
            stops = StopMatcher(s.stop, s.include_stop_str_in_output, hidden=answer_ends)
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stop_ids = format_stop_ids | set(s.stop_token_ids)
            produced: list[int] = []
            for token in llm.generate(prompt_ids, **self._sampler_args(s)):
                if cancel.is_set():  # at most this one token was decoded after the cancel
                    return
                produced.append(token)
                may_stop = len(produced) > (s.min_tokens or 0)
                special_end = llama_cpp.llama_vocab_is_eog(vocab, token) and not s.ignore_eos
                if may_stop and (special_end or token in stop_ids):
                    tail = utf8.decode(b"", final=True) + stops.flush()
                    reason = str(token) if token in s.stop_token_ids else None
                    hand_over(_Piece(tail, (token,), ("stop", reason)))
                    return
                previous = produced[:-1][-8:]  # context for SentencePiece's leading-space rule
                raw = llm.detokenize([token], prev_tokens=previous, special=not s.skip_special_tokens)
                shown, matched = stops.feed(utf8.decode(raw))
                if leading and shown:
                    shown = shown.lstrip()
                    leading = not shown
                if matched is not None:
                    hand_over(_Piece(shown, (token,), ("stop", None if matched in answer_ends else matched)))
                    return
                if len(produced) >= max_tokens:
                    tail = shown + utf8.decode(b"", final=True) + stops.flush()
                    hand_over(_Piece(tail, (token,), ("length", None)))
                    return
                hand_over(_Piece(shown, (token,)))
            hand_over(_Piece("", (), ("length", None)))  # the generator ended: the context is full
        except BaseException as e:  # handed to the stream, which raises it as DependencyDown
            hand_over(_Piece(error=e))

    def _sampler_args(self, s: Sampling) -> dict[str, Any]:
        d = self.settings.defaults
        top_k = s.top_k if s.top_k is not None else int(d["top_k"])
        return {
            "temp": s.temperature if s.temperature is not None else d["temperature"],
            "top_p": s.top_p if s.top_p is not None else d["top_p"],
            "top_k": top_k if top_k > 0 else 0,
            "min_p": s.min_p if s.min_p is not None else d["min_p"],
            "repeat_penalty": s.repetition_penalty or 1.0,
            "presence_penalty": s.presence_penalty or 0.0,
            "frequency_penalty": s.frequency_penalty or 0.0,
            "reset": True,  # keeps the prompt prefix the slot already holds in its KV cache
        }

    @staticmethod
    def _special_id(llm: Any, text: str) -> int | None:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        return int(ids[0]) if len(ids) == 1 else None

    @staticmethod
    def _token_text(llm: Any, token: int) -> str:
        return bytes(llm.detokenize([token], special=True)).decode("utf-8", errors="replace")

    def _require_started(self) -> Any:
        if not self._slots:
            raise DependencyDown(f"the llamacpp engine for {self._info.name!r} is not started (or shut down)")
        return self._slots[0]
