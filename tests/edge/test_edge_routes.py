"""The routing table against the contracts: every RPC with a REST binding is reachable."""

from __future__ import annotations

import re
from pathlib import Path

from llmesh.edge.bootstrap import route_table
from llmesh.edge.descriptor import http_routes, rpc_names
from llmesh.edge.filters import PUBLIC_SERVICES, lua_source
from llmesh.edge.settings import GRPC_SERVICE_OF


def cluster_for(grpc_path: str) -> str | None:
    """The cluster Envoy's first matching prefix route sends `grpc_path` to."""
    for prefix, cluster in route_table():
        if grpc_path.startswith(prefix):
            return cluster
    return None


def test_public_services_are_those_with_rest_bindings(descriptor_path: Path) -> None:
    annotated = {route.service for route in http_routes(descriptor_path)}
    assert set(PUBLIC_SERVICES) == annotated
    assert "llmesh.worker.v1.WorkerService" not in annotated


def test_every_rest_binding_routes_to_its_service(descriptor_path: Path) -> None:
    routes = http_routes(descriptor_path)
    assert len(routes) >= 30
    cluster_of = {service: cluster for cluster, service in GRPC_SERVICE_OF.items()}
    for route in routes:
        assert route.service in PUBLIC_SERVICES, route
        assert cluster_for(route.grpc_path) == cluster_of[route.service], route


def test_every_rpc_of_a_public_service_passes_through_natively(descriptor_path: Path) -> None:
    cluster_of = {service: cluster for cluster, service in GRPC_SERVICE_OF.items()}
    for service, methods in rpc_names(descriptor_path).items():
        for method in methods:
            found = cluster_for(f"/{service}/{method}")
            if service in cluster_of:
                assert found == cluster_of[service], (service, method)
            else:
                assert found is None, (service, method)  # workers are internal: no edge route


def test_reflection_and_health_reach_the_gateway() -> None:
    assert cluster_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == "gateway"
    assert cluster_for("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") == "gateway"
    assert cluster_for("/grpc.health.v1.Health/Check") == "gateway"


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
