"""The config loader: YAML + environment overrides into frozen, typed objects; clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llmesh.common.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llmesh.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, {})
    assert cfg.server.envoy_port == 8080 and cfg.server.registry_port == 50052
    assert cfg.address_of("scheduler") == "127.0.0.1:50054"
    assert cfg.auth.enabled is False and cfg.models == ()


def test_file_then_environment_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
server: {envoy_port: 6000}
models:
  - name: qwen2-7b
    aliases: [qwen2]
    path: /models/qwen2
    max_model_len: 8192
workers:
  - worker_id: gpu-0
    labels: {gpu: a100}
""",
    )
    cfg = load_config(
        path,
        {
            "LLMESH_SERVER__ENVOY_PORT": "7000",
            "LLMESH_ENDPOINTS__REGISTRY": "registry:50052",
            "LLMESH_AUTH__ENABLED": "true",
            "UNRELATED": "x",
        },
    )
    assert cfg.server.envoy_port == 7000
    assert cfg.address_of("registry") == "registry:50052"
    assert cfg.auth.enabled is True
    assert cfg.model("qwen2").name == "qwen2-7b" and cfg.models[0].max_model_len == 8192
    assert cfg.workers[0].labels == {"gpu": "a100"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.envoy_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "env", "words"),
    [
        ("server: {gatway_port: 1}", {}, "unknown key(s) ['gatway_port']"),
        ("server: {envoy_port: lots}", {}, "server.envoy_port: expected int"),
        ("models: [{path: /x}]", {}, "models[0]"),
        ("server: [1, 2]", {}, "server: expected a mapping"),
        (": : :", {}, "not valid YAML"),
        ("", {"LLMESH_AUTH__ENABLED": "maybe"}, "auth.enabled: expected true/false"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env)
    assert words in str(info.value)


def test_missing_file_and_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", {})
    with pytest.raises(ConfigError, match="no model named 'x'"):
        load_config(None, {}).model("x")


def test_the_removed_gateway_settings_are_refused_by_name(tmp_path: Path) -> None:
    # The gateway process is gone (workers serve ModelService behind Envoy): an old config says so.
    path = write(tmp_path, "server: {gateway_port: 50051}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "gateway_port" in str(info.value)
