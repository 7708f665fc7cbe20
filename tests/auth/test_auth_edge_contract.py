"""The ext_authz filter settings are valid Envoy v3 config, and AuthService fails closed without Redis."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from google.protobuf import json_format
from google.rpc import code_pb2

from llmesh.auth.edge_contract import ext_authz_filter_config, http_filter
from llmesh.auth.v1 import auth_service_pb2 as pb
from llmesh.common.errors import DependencyDown
from tests.auth.conftest import AuthFactory, bearer, check_request
from tests.auth.test_auth_ext_authz import CHAT, chat
from tests.support import require


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


class PrivateRedis:
    """A redis-server of this test's own, so the test can take it away."""

    def __init__(self, tmp_path: Path) -> None:
        server = shutil.which("redis-server")
        require(server is not None, "redis-server is not installed (apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._proc = subprocess.Popen(
            [
                str(server),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


async def test_redis_lost_at_runtime_denies_with_503(
    make_auth: AuthFactory, private_redis: PrivateRedis
) -> None:
    """Fail closed: with its counters unreachable, Check denies inference (503) instead of allowing it."""
    a = await make_auth(redis_url=f"redis://127.0.0.1:{private_redis.port}/0")
    made = await a.auth.CreateApiKey(pb.CreateApiKeyRequest(name="k"), metadata=bearer(a.admin_key))
    auth = {"authorization": f"Bearer {made.secret}"}
    assert (await a.authz.Check(check_request(CHAT, auth, chat()))).status.code == code_pb2.OK
    private_redis.stop()
    r = await a.authz.Check(check_request(CHAT, auth, chat()))
    assert r.status.code == code_pb2.UNAVAILABLE and r.denied_response.status.code == 503
    assert "Redis" in json.loads(r.denied_response.body)["error"]["message"]
