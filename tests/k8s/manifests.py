"""Render the kustomize overlays with kubectl and walk the objects they produce."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# Kinds from CRDs: kubernetes-validate has no schema for them; tests check them by hand.
CRD_KINDS = ("ScaledObject", "Certificate", "Issuer", "PodMonitor")
# The kubelet's probe port on every Envoy (llmesh.edge.sidecar.PROBE_PORT).
PROBE_PORT = 15021


def tool(name: str) -> str | None:
    """A command-line tool: the one beside this Python (the venv's bin) first, then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize k8s/overlays/<overlay>` as parsed objects (kubectl must exist)."""
    kubectl = tool("kubectl")
    assert kubectl is not None
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def rendered_text(overlay: str) -> str:
    return yaml.safe_dump_all(render(overlay), sort_keys=False)


def of_kind(objects: tuple[dict[str, Any], ...], *kinds: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] in kinds]


def named(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise KeyError(f"no {kind}/{name}")


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    template = workload["spec"]["template"]
    if workload["kind"] == "Job":
        return dict(template["spec"])
    return dict(template["spec"])


def containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, container) for every init container and container of a pod spec."""
    for container in spec.get("initContainers", []):
        kind = "sidecar" if container.get("restartPolicy") == "Always" else "init"
        yield kind, container
    for container in spec.get("containers", []):
        yield "app", container


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels only, as llmesh uses) against pod labels."""
    if set(selector) - {"matchLabels"}:
        raise AssertionError(f"unsupported selector {selector}")
    match = selector.get("matchLabels", {})
    return all(labels.get(key) == value for key, value in match.items())


def config_of(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The llmesh YAML from the rendered llmesh-config ConfigMap."""
    for obj in of_kind(objects, "ConfigMap"):
        if obj["metadata"]["name"].startswith("llmesh-config"):
            return dict(yaml.safe_load(obj["data"]["llmesh.yaml"]))
    raise KeyError("no llmesh-config ConfigMap")
