"""The ext_authz filter settings are valid Envoy v3 config, and AuthService fails closed without Redis."""

from __future__ import annotations

import socket

import pytest
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from google.protobuf import json_format

from llmesh.auth.edge_contract import ext_authz_filter_config, http_filter
from llmesh.common.errors import DependencyDown
from tests.auth.conftest import AuthFactory


def test_filter_config_parses_as_envoy_ext_authz() -> None:
    config = ext_authz_filter_config("llmesh_auth", max_request_bytes=10 * 1024 * 1024)
    parsed = ext_authz_pb2.ExtAuthz()
    json_format.ParseDict({k: v for k, v in config.items() if k != "@type"}, parsed)
    assert parsed.grpc_service.envoy_grpc.cluster_name == "llmesh_auth"
    assert parsed.with_request_body.pack_as_bytes and not parsed.with_request_body.allow_partial_message
    assert not parsed.failure_mode_allow and parsed.status_on_error.code == 503
    assert config["@type"].endswith(ext_authz_pb2.ExtAuthz.DESCRIPTOR.full_name)
    assert http_filter("c", max_request_bytes=1)["name"] == "envoy.filters.http.ext_authz"


async def test_unreachable_redis_fails_start_up_clearly(make_auth: AuthFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DependencyDown) as err:
        await make_auth(redis_url=f"redis://127.0.0.1:{port}/0")
    assert f"127.0.0.1:{port}" in err.value.message
