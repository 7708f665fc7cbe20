"""Build a tiny random-weight Llama model with a real tokenizer, entirely offline.

The model exists so tests and local runs can start a real engine (vLLM on CPU included) in seconds:
its output is gibberish, but every code path (tokenizer, chat template, sampling, streaming, stop
conditions, KV cache) is the real one. Nothing is downloaded: the byte-level BPE tokenizer is
trained on the small English corpus embedded below.

Shape: hidden 128, 2 heads of 64 (vLLM's CPU attention rejects head_dim 16), 1 KV head, 2 layers,
intermediate 256, 2048 positions, untied embeddings. Deterministic for a given seed and vocab size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MARKER = "llmesh-tiny-model.json"
FORMAT_VERSION = 1
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>")
PAD, BOS, EOS = SPECIAL_TOKENS[:3]
MAX_POSITIONS = 2048

# Roles render as their own special token; the reply ends with EOS, which is also the stop token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CORPUS = """\
The worker keeps one engine busy and streams every token back as soon as it is ready.
A request arrives with a prompt, a few sampling settings and a deadline. The scheduler picks a
worker with room to spare, and the gateway talks to that worker directly, so no token takes an
extra hop. When the client goes away, the call is cancelled and the engine stops working on it.

Good services say what went wrong and what to do next. If the prompt is too long, the answer names
the limit and the length that was sent. If the model is unknown, the answer lists the models that
are served. If the queue is full, the answer says when to try again.

The morning was cold and clear. She walked along the river to the old bridge, where the market
opened at seven. There were apples and pears, bread still warm from the oven, cheese from the hills,
and fish from the boats that had come in before dawn. People talked about the weather, the price of
wood, and the new school that would open in the autumn. Children ran between the stalls while their
parents counted coins and carried baskets home.

In the afternoon the wind turned, and clouds came over the western hills. The farmers looked at the
sky and hurried to bring in the hay. By evening the rain had started, steady and soft, and the
streets were quiet. Lights came on in the windows one after another, and the smell of supper
drifted from kitchen doors.

Numbers help us reason about systems: one request, two workers, three models, four queues, five
seconds, ten thousand tokens, one hundred users, a thousand keys. We measure latency in
milliseconds, throughput in tokens per second, and memory in gigabytes. A cache that hits often
saves work; a queue that grows without bound hides a problem until it is too late.

Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are in a week? Answer: There are seven days in a week.
Question: What color is the sky on a clear day? Answer: The sky is blue on a clear day.
Question: Why do we write tests? Answer: Tests tell us quickly when a change breaks something.

Write clearly. Use short sentences when they help, and longer ones when the idea needs room. Read
your work aloud; the ear finds mistakes the eye forgets. Keep names simple and consistent, and say
why a choice was made, not only what it is. Small tools that do one thing well are easy to trust.

The library was open late on Thursdays. Students sat at long wooden tables with their books and
notes, and the only sounds were pages turning and the soft tick of the clock above the door. Outside,
the first snow of the year was falling on the square, covering the benches and the statue of a poet
whose name nobody could quite remember.
"""


def build_tiny_model(path: Path, *, seed: int = 0, vocab_size: int = 512, show_progress: bool = True) -> Path:
    """Write the tiny model and its tokenizer to `path` (a directory) and return it.

    Idempotent: if `path` already holds a complete tiny model built with the same parameters, it is
    returned untouched. A directory holding something else is refused rather than overwritten.
    """
    path = Path(path)
    params = {"format": FORMAT_VERSION, "seed": seed, "vocab_size": vocab_size}
    if _matches(path, params):
        return path
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS) + 1} (256 bytes + specials)"
        )
    if path.exists() and any(path.iterdir()) and not (path / MARKER).exists():
        raise ValueError(f"{path} is not empty and holds no tiny model; pass an empty or new directory")

    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with tqdm(total=3, desc="tiny model", disable=not show_progress, unit="step") as bar:
            bar.set_postfix_str("train tokenizer")
            tokenizer = _train_tokenizer(vocab_size)
            bar.update()
            bar.set_postfix_str("build model")
            model, generation_config = _build_model(tokenizer, seed=seed, vocab_size=vocab_size)
            bar.update()
            bar.set_postfix_str("save")
            with _transformers_progress(show_progress):
                model.save_pretrained(staging)
            generation_config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            _portable_tokenizer_config(staging / "tokenizer_config.json")
            (staging / MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
            bar.update()
        # mkdtemp makes a private directory; a model directory is meant to be shared read-only.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        _publish(staging, path, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers draws its own bars while saving; follow our show_progress, then restore."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _portable_tokenizer_config(file: Path) -> None:
    """Make tokenizer_config.json readable by transformers 4 and 5 alike.

    transformers 5 writes the chat template to chat_template.jinja and names the class
    "TokenizersBackend"; older readers (and some engines) look for `chat_template` in this file and
    know the class as PreTrainedTokenizerFast, which transformers 5 still resolves.
    """
    config = json.loads(file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _matches(path: Path, params: dict[str, int]) -> bool:
    try:
        found = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return found == params and all((path / name).is_file() for name in required)


def _publish(staging: Path, path: Path, params: dict[str, int]) -> None:
    """Move the finished build into place; a concurrent builder that won the race is fine too."""
    if path.exists():
        shutil.rmtree(path)  # empty, or a tiny model built with other parameters (checked above)
    try:
        os.replace(staging, path)
    except OSError:
        if not _matches(path, params):
            raise


def _train_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Plain prompts get BOS like Llama's; the chat template writes BOS itself.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_model(tokenizer, *, seed: int, vocab_size: int):  # -> (LlamaForCausalLM, GenerationConfig)
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {
        name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("pad", PAD), ("bos", BOS), ("eos", EOS))
    }
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        intermediate_size=256,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    # Seed a private generator state so building never disturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float().eval()
    generation = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    model.generation_config = generation
    return model, generation


def main(argv: list[str] | None = None) -> None:
    """`python -m llmesh.worker.tiny_model PATH`: build the tiny model at PATH."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.path, seed=args.seed, vocab_size=args.vocab_size))


if __name__ == "__main__":
    main()
