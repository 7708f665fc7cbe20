"""The routing table against the contracts: every public RPC reaches the cluster that serves it,
inference through the endpoint picker to the workers, and internal RPCs have no route at all."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from llmesh.edge import EdgeSettings
from llmesh.edge.bootstrap import CONTROL_EXTRA_PREFIXES, public_rpcs, route_configuration, route_table
from llmesh.edge.descriptor import http_routes, rpc_names
from llmesh.edge.filters import PUBLIC_SERVICES, lua_source
from llmesh.edge.settings import CATALOG_CLUSTER, GRPC_SERVICE_OF, MODEL_SERVICE
from llmesh.edge.workers import WORKERS_CLUSTER, inference_paths
from llmesh.scheduler.picker_request import INFERENCE_METHODS

INFERENCE = {
    f"/{MODEL_SERVICE}/{method}"
    for method in (
        "CreateChatCompletion",
        "StreamChatCompletion",
        "CreateCompletion",
        "StreamCompletion",
        "CreateEmbeddings",
        "Tokenize",
        "Detokenize",
    )
}


def expected_cluster(grpc_path: str) -> str:
    """Where the design says a public RPC goes."""
    if grpc_path in INFERENCE:
        return WORKERS_CLUSTER
    service = grpc_path.split("/")[1]
    if service == MODEL_SERVICE:
        return CATALOG_CLUSTER  # catalog reads: the registry serves them
    return {s: cluster for cluster, s in GRPC_SERVICE_OF.items()}[service]


@functools.cache
def rendered_routes() -> list[dict[str, Any]]:
    """The routes of the rendered config, as Envoy gets them (rendered once: it takes a while)."""
    config = route_configuration(EdgeSettings()).to_dict()
    (host,) = config["virtualHosts"]
    return list(host["routes"])


def envoy_cluster_for(grpc_path: str) -> str | None:
    """The cluster of the first rendered route that matches `grpc_path`, as Envoy matches; None
    when that is the catch-all 404 (or nothing)."""
    for route in rendered_routes():
        match = route["match"]
        if match.get("path") == grpc_path or ("prefix" in match and grpc_path.startswith(match["prefix"])):
            return str(route["route"]["cluster"]) if "route" in route else None
    return None


def test_public_services_are_those_with_rest_bindings(descriptor_path: Path) -> None:
    annotated = {route.service for route in http_routes(descriptor_path)}
    assert set(PUBLIC_SERVICES) == annotated
    assert "llmesh.worker.v1.WorkerService" not in annotated


def test_inference_rpcs_are_the_pickers(descriptor_path: Path) -> None:
    """The edge sends exactly the RPCs the picker knows how to read to the workers."""
    assert set(inference_paths()) == INFERENCE == set(INFERENCE_METHODS)
    assert INFERENCE <= set(public_rpcs(descriptor_path))


def test_every_public_rpc_routes_to_its_cluster(descriptor_path: Path) -> None:
    public = public_rpcs(descriptor_path)
    assert len(public) >= 30
    table = dict(route_table(descriptor_path))
    for path in public:
        assert table.get(path) == expected_cluster(path), path
        assert envoy_cluster_for(path) == expected_cluster(path), path


def test_every_rest_binding_routes_to_its_service(descriptor_path: Path) -> None:
    for route in http_routes(descriptor_path):
        assert route.service in PUBLIC_SERVICES, route
        assert envoy_cluster_for(route.grpc_path) == expected_cluster(route.grpc_path), route


def test_public_rpcs_have_exact_path_routes(descriptor_path: Path) -> None:
    exact = {r["match"]["path"] for r in rendered_routes() if "path" in r["match"]}
    assert set(public_rpcs(descriptor_path)) <= exact
    prefixes = [r["match"]["prefix"] for r in rendered_routes() if "prefix" in r["match"]]
    # Reflection and health, no service prefix; then the catch-all 404, last.
    assert prefixes == [*CONTROL_EXTRA_PREFIXES, "/"]
    last = rendered_routes()[-1]
    assert last["match"] == {"prefix": "/"} and "route" not in last
    assert last["directResponse"]["status"] == 404


def test_internal_rpcs_have_no_route(descriptor_path: Path) -> None:
    public = set(public_rpcs(descriptor_path))
    internal = [
        f"/{service}/{method}"
        for service, methods in rpc_names(descriptor_path).items()
        for method in methods
        if f"/{service}/{method}" not in public
    ]
    # The membership, lease and usage RPCs, and all of WorkerService.
    for name in (
        "/llmesh.registry.v1.RegistryService/RegisterWorker",
        "/llmesh.registry.v1.RegistryService/Heartbeat",
        "/llmesh.registry.v1.RegistryService/WatchWorkers",
        "/llmesh.scheduler.v1.SchedulerService/Acquire",
        "/llmesh.scheduler.v1.SchedulerService/Release",
        "/llmesh.auth.v1.AuthService/RecordUsage",
        "/llmesh.worker.v1.WorkerService/Generate",
    ):
        assert name in internal
    table = dict(route_table(descriptor_path))
    for path in internal:
        assert path not in table, path
        assert envoy_cluster_for(path) is None, path


def test_reflection_and_health_reach_the_registry() -> None:
    assert envoy_cluster_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == "registry"
    assert envoy_cluster_for("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") == "registry"
    assert envoy_cluster_for("/grpc.health.v1.Health/Check") == "registry"


def test_stream_routing_pairs_match_the_contract(descriptor_path: Path) -> None:
    """Each path Lua redirects on `"stream": true` is a unary RPC's POST path, and its target is
    the POST path of a server-streaming RPC of the same service taking the same body."""
    pairs = dict(re.findall(r'\["(/v1/[^"]+)"\] = "(/v1/[^"]+)"', lua_source()))
    assert pairs == {
        "/v1/chat/completions": "/v1/chat/completions:stream",
        "/v1/completions": "/v1/completions:stream",
    }
    by_path = {(route.verb, route.path): route for route in http_routes(descriptor_path)}
    for unary_path, stream_path in pairs.items():
        unary = by_path[("POST", unary_path)]
        stream = by_path[("POST", stream_path)]
        assert not unary.server_streaming and stream.server_streaming
        assert unary.service == stream.service
        assert unary.body == stream.body == "*"
        # Both RPCs are inference: the picker leases a worker for them.
        assert unary.grpc_path in INFERENCE and stream.grpc_path in INFERENCE
