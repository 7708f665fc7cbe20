"""A Hugging Face tokenizer held by the worker, for upstream engines that cannot tokenize for us.

The openai engine uses it (when `models[].tokenizer` names one) to answer tokenize/detokenize, to
check the context length before a request leaves, and to count usage when the upstream streams no
usage. `transformers` is imported on load only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llmesh.common.errors import DependencyDown, InvalidRequest
from llmesh.worker.engine import GenerationInput


class LocalTokenizer:
    """Encode prompts and chats (with the tokenizer's chat template), decode ids, count text."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self._tok = tokenizer
        self._chat_template = chat_template

    @classmethod
    async def load(cls, source: str, chat_template: str | None = None) -> LocalTokenizer:
        """Load from a directory or hub id, off the event loop (it reads files)."""
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise DependencyDown(
                f"tokenizer {source!r} needs the transformers package (pip install transformers)"
            ) from e
        try:
            tok = await asyncio.to_thread(AutoTokenizer.from_pretrained, source)
        except Exception as e:  # OSError (not found), ValueError (not a tokenizer)
            raise DependencyDown(f"could not load tokenizer {source!r}: {e}") from e
        return cls(tok, chat_template)

    def encode(self, input: GenerationInput, add_special_tokens: bool = True) -> list[int]:
        if input.prompt_token_ids is not None:
            return list(input.prompt_token_ids)
        if input.chat is None:
            return list(self._tok.encode(input.prompt or "", add_special_tokens=add_special_tokens))
        messages = [{"role": m.role, "content": m.content} for m in input.chat]
        try:
            text = self._tok.apply_chat_template(
                messages,
                chat_template=input.chat_template or self._chat_template,
                add_generation_prompt=input.add_generation_prompt,
                tokenize=False,
            )
        except Exception as e:  # no template (ValueError) or a broken one (jinja2 errors)
            raise InvalidRequest(f"could not render the chat with the local tokenizer: {e}") from e
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        top = len(self._tok) - 1
        bad = [i for i in ids if not 0 <= i <= top]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary (0..{top})")
        return str(self._tok.decode(list(ids)))

    def count(self, text: str) -> int:
        """Tokens in generated `text` (no special tokens added)."""
        return len(self._tok.encode(text, add_special_tokens=False)) if text else 0
