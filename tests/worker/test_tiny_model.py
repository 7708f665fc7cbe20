"""The tiny test model: builds offline, its tokenizer and chat template work, rebuilding is a no-op."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the tiny model needs the cpu or gpu extra")

from llmesh.worker.tiny_model import MARKER, build_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", show_progress=False)


def test_files_and_config(model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        128,
        2,
        1,
    )
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # vLLM CPU attention rejects 16
    assert (config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]) == (2, 256, 512)
    assert config["max_position_embeddings"] == 2048 and config["tie_word_embeddings"] is False
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert "chat_template" in json.loads((model_dir / "tokenizer_config.json").read_text())


def test_tokenizer_roundtrip_and_chat_template(model_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")

    text = "Hello world, the market opened at seven. Ünïcödé too: ✓"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi!<|eos|>\n<|assistant|>\n"
    without = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not without.endswith("<|assistant|>\n")
    chat_ids = tok.encode(rendered, add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<|assistant|>") in chat_ids  # role markers are single tokens
    assert tok.decode(chat_ids) == rendered


def test_idempotent_and_deterministic(model_dir: Path, tmp_path: Path) -> None:
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    began = time.perf_counter()
    assert build_tiny_model(model_dir, show_progress=False) == model_dir
    assert time.perf_counter() - began < 0.5
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp

    again = build_tiny_model(tmp_path / "again", show_progress=False)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name

    other = build_tiny_model(tmp_path / "again", seed=1, show_progress=False)  # new params: rebuilt
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()


def test_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_tiny_model(tmp_path, show_progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
