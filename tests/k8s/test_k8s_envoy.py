"""The Envoy configs the manifests mount: current, valid for `envoy --mode validate` at the very
paths the pods mount (certificates from `llmesh certs`), and a real sidecar that admits only the
identities the mesh allows."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmesh.cli.certs import write_bundle
from llmesh.edge.descriptor import default_descriptor_path
from llmesh.edge.sidecar import (
    DESCRIPTOR_PATH,
    MESH,
    TLS_DIR,
    SidecarSettings,
    main,
    sidecar_bootstrap,
    to_yaml,
)
from llmesh.edge.validate import EnvoyNotFound, find_envoy
from tests.k8s.manifests import K8S, containers, named, pod_spec, render, tool
from tests.support import free_port, require

GENERATED = K8S / "base" / "envoy"


@pytest.fixture(scope="module")
def envoy_bin() -> Path:
    try:
        return find_envoy()
    except EnvoyNotFound as error:
        require(False, str(error))
        raise


def test_generated_configs_are_current() -> None:
    args = ["--out", str(GENERATED), "--descriptor", str(default_descriptor_path()), "--check"]
    assert main(args) == 0, "k8s/base/envoy is stale: run `make k8s-generate`"


def _filenames(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("filename", "path") and isinstance(value, str) and value.startswith("/etc/"):
                yield value
            yield from _filenames(value)
    elif isinstance(node, list):
        for item in node:
            yield from _filenames(item)


def test_configs_read_only_files_the_pods_mount() -> None:
    objects = render("cpu-dev")
    for name in (*MESH, "edge"):
        spec = pod_spec(named(objects, "Deployment", name))
        envoy = next(c for _, c in containers(spec) if c["name"] == "envoy")
        mounted = [m["mountPath"] for m in envoy["volumeMounts"]]
        config = yaml.safe_load(
            (GENERATED / ("edge.yaml" if name == "edge" else f"sidecar-{name}.yaml")).read_text()
        )
        for path in _filenames(config):
            assert any(path == m or path.startswith(m + "/") for m in mounted), (
                f"{name}: {path} is not mounted"
            )


def _private_etc(tmp_path: Path, identity: str) -> Path:
    """A copy of /etc with the pod's mounts filled in: the identity's Secret files at TLS_DIR and
    the descriptor set at DESCRIPTOR_PATH."""
    etc = tmp_path / "etc"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True, dirs_exist_ok=True)
    bundle = tmp_path / "bundle"
    write_bundle(bundle, [identity])
    tls = etc / Path(TLS_DIR).relative_to("/etc")
    tls.mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "tls.crt", "tls.key"):
        shutil.copy(bundle / identity / name, tls / name)
    descriptor = etc / Path(DESCRIPTOR_PATH).relative_to("/etc")
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(GENERATED / descriptor.name, descriptor)
    return etc


@pytest.mark.parametrize("identity", [*MESH, "edge"])
def test_rendered_config_validates_at_the_mounted_paths(
    identity: str, envoy_bin: Path, tmp_path: Path
) -> None:
    unshare = tool("unshare")
    require(unshare is not None, "unshare (util-linux) is missing")
    assert unshare is not None
    etc = _private_etc(tmp_path, identity)
    config = GENERATED / ("edge.yaml" if identity == "edge" else f"sidecar-{identity}.yaml")
    root = [] if os.geteuid() == 0 else ["--map-root-user"]
    # A private mount namespace: /etc is the copy with the pod's files, for Envoy only.
    command = f"mount --bind {etc} /etc && exec {envoy_bin} --mode validate -c {config} --log-level warn"
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", *root, "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if "mount" in result.stderr and "Operation not permitted" in result.stderr:
        require(False, f"no private mount namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "OK" in result.stdout + result.stderr


def test_validation_fails_without_the_certificates(envoy_bin: Path, tmp_path: Path) -> None:
    # The check above proves something only because Envoy does read the files in validate mode.
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        to_yaml(sidecar_bootstrap(SidecarSettings("auth", tls_dir=str(tmp_path / "none"))), "x")
    )
    result = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "none/ca.crt" in result.stdout + result.stderr


# ------------------------------------------------------------------ a real sidecar in front of an app


@contextlib.contextmanager
def running_sidecar(envoy_bin: Path, settings: SidecarSettings, tmp_path: Path) -> Iterator[None]:
    """Envoy with `settings`' sidecar config, until its probe port answers; stopped on exit."""
    config = tmp_path / f"sidecar-{settings.service}-{settings.mesh.mtls_port}.yaml"
    config.write_text(to_yaml(sidecar_bootstrap(settings), f"the {settings.service} sidecar (test)"))
    log_path = config.with_suffix(".log")
    with log_path.open("wb") as log:
        envoy = subprocess.Popen(
            [
                str(envoy_bin),
                "-c",
                str(config),
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "--base-id",
                str(settings.admin_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    ready = f"http://127.0.0.1:{settings.probe_port}/healthz/ready"
                    with urllib.request.urlopen(ready, timeout=1):
                        break
                except OSError:
                    assert envoy.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, "the sidecar did not come up"
                    time.sleep(0.1)
            yield
        finally:
            envoy.terminate()
            envoy.wait(10)


def _sidecar_settings(
    service: str, bundle: Path, identity: str | None = None, **extra: object
) -> SidecarSettings:
    return SidecarSettings(
        service,
        tls_dir=str(bundle / (identity or service)),
        mtls_port=free_port(),
        probe_port=free_port(),
        admin_port=free_port(),
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
def registry_sidecar(envoy_bin: Path, tmp_path: Path) -> Iterator[dict[str, object]]:
    """A gRPC health server standing in for the registry app, behind the registry's real sidecar
    config (free ports, certificates from `llmesh certs` in a temporary directory)."""
    app = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, app)
    app_port = app.add_insecure_port("127.0.0.1:0")
    app.start()
    bundle = tmp_path / "tls"
    write_bundle(bundle, ["registry", "edge", "scheduler", "auth"])
    settings = _sidecar_settings("registry", bundle, app_port=app_port)
    try:
        with running_sidecar(envoy_bin, settings, tmp_path):
            yield {"settings": settings, "bundle": bundle, "servicer": servicer}
    finally:
        app.stop(None)


def _check(port: int, bundle: Path | None, identity: str | None, timeout: float = 5.0) -> int:
    """Health/Check through the sidecar's mTLS port presenting `identity`'s certificate."""
    if bundle is None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    else:
        ca = (bundle / "ca.crt").read_bytes()
        if identity is None:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca,
                private_key=(bundle / identity / "tls.key").read_bytes(),
                certificate_chain=(bundle / identity / "tls.crt").read_bytes(),
            )
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", "registry")]
        )
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return int(reply.status)


def test_sidecar_admits_the_identities_the_mesh_allows(registry_sidecar: dict[str, object]) -> None:
    settings = registry_sidecar["settings"]
    bundle = registry_sidecar["bundle"]
    assert isinstance(settings, SidecarSettings) and isinstance(bundle, Path)
    assert set(MESH["registry"].clients) == {"edge", "scheduler", "workers"}
    for caller in ("edge", "scheduler"):
        assert _check(settings.mesh.mtls_port, bundle, caller) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("caller", ["auth", None, "plaintext"])
def test_sidecar_refuses_other_identities_no_certificate_and_plaintext(
    registry_sidecar: dict[str, object], caller: str | None
) -> None:
    settings = registry_sidecar["settings"]
    bundle = registry_sidecar["bundle"]
    assert isinstance(settings, SidecarSettings) and isinstance(bundle, Path)
    with pytest.raises(grpc.RpcError) as error:
        _check(settings.mesh.mtls_port, None if caller == "plaintext" else bundle, caller, timeout=3.0)
    assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_probe_port_serves_the_apps_health_and_nothing_else(registry_sidecar: dict[str, object]) -> None:
    settings = registry_sidecar["settings"]
    servicer = registry_sidecar["servicer"]
    assert isinstance(settings, SidecarSettings) and isinstance(servicer, health.HealthServicer)
    assert _check(settings.probe_port, None, None) == health_pb2.HealthCheckResponse.SERVING
    # Draining: the app says NOT_SERVING and the kubelet, asking through the sidecar, hears it.
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _check(settings.probe_port, None, None) == health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(f"127.0.0.1:{settings.probe_port}") as channel:
        other = channel.unary_unary("/llmesh.registry.v1.RegistryService/ListWorkers")
        with pytest.raises(grpc.RpcError) as error:
            other(b"", timeout=3.0)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED  # Envoy's 404: no route


@pytest.mark.parametrize(("identity", "admitted"), [("scheduler", True), ("auth", False)])
def test_an_app_reaches_its_peer_through_both_sidecars_only_with_an_allowed_identity(
    registry_sidecar: dict[str, object], envoy_bin: Path, tmp_path: Path, identity: str, admitted: bool
) -> None:
    """scheduler app -> 127.0.0.1 (its sidecar's egress) -> mTLS -> registry sidecar -> registry app:
    the path of every call between pods. With another identity's certificate the registry refuses."""
    registry = registry_sidecar["settings"]
    bundle = registry_sidecar["bundle"]
    assert isinstance(registry, SidecarSettings) and isinstance(bundle, Path)
    egress = free_port()
    scheduler = _sidecar_settings(
        "scheduler",
        bundle,
        identity,
        app_port=free_port(),
        peer_addresses={"registry": f"127.0.0.1:{registry.mesh.mtls_port}"},
        egress_ports={"registry": egress},
    )
    with running_sidecar(envoy_bin, scheduler, tmp_path):
        if admitted:
            assert _check(egress, None, None) == health_pb2.HealthCheckResponse.SERVING
        else:
            with pytest.raises(grpc.RpcError) as error:
                _check(egress, None, None, timeout=3.0)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
