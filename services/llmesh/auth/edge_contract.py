"""What the edge needs from AuthService: the ext_authz filter settings, in Envoy's own JSON.

The edge generator places this filter after the gRPC-JSON transcoder and before the router (and
the picker's ext_proc), so Check sees the gRPC method path and the request as a gRPC frame for
REST and native gRPC clients alike. Which routes are public, admin-only or internal lives in
`llmesh.auth.routes`; the identity headers an allowed request carries are in
`llmesh.auth.ext_authz` (IDENTITY_HEADERS).
"""

from __future__ import annotations

from typing import Any

from llmesh.auth.ext_authz import IDENTITY_HEADERS

FILTER_NAME = "envoy.filters.http.ext_authz"
FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"


def ext_authz_filter_config(
    auth_cluster: str, *, max_request_bytes: int, timeout_s: float = 1.0
) -> dict[str, Any]:
    """The HTTP filter's typed config (JSON form of ExtAuthz v3), ready for an HttpFilter.

    - Fail closed: an unreachable AuthService answers 503, never lets a request through.
    - The whole body, packed as bytes: the frame carries model and max_tokens for the allow-list
      and the reservation. Bodies over `max_request_bytes` are refused by Envoy (413), so keep it
      at the edge's request limit.
    """
    return {
        "@type": FILTER_TYPE,
        "transport_api_version": "V3",
        "grpc_service": {
            "envoy_grpc": {"cluster_name": auth_cluster},
            "timeout": f"{timeout_s:g}s",
        },
        "failure_mode_allow": False,
        "status_on_error": {"code": 503},
        "with_request_body": {
            "max_request_bytes": max_request_bytes,
            "allow_partial_message": False,
            "pack_as_bytes": True,
        },
        # Identity headers Check sets are the only x-llmesh-* upstream sees; Check also removes
        # the client's. Routing does not depend on them, so the route cache stays.
        "clear_route_cache": False,
        "stat_prefix": "llmesh_auth",
    }


def http_filter(auth_cluster: str, *, max_request_bytes: int, timeout_s: float = 1.0) -> dict[str, Any]:
    """The HttpConnectionManager `http_filters` entry."""
    return {
        "name": FILTER_NAME,
        "typed_config": ext_authz_filter_config(
            auth_cluster, max_request_bytes=max_request_bytes, timeout_s=timeout_s
        ),
    }


__all__ = ["CHECK_METHOD", "FILTER_NAME", "IDENTITY_HEADERS", "ext_authz_filter_config", "http_filter"]
