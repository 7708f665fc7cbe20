"""`llmesh serve auth` as a real process: the first admin's credentials reach the supervisor once,
through the owner-only ready file, and never the log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from llmesh.auth.v1 import auth_service_pb2 as pb
from llmesh.auth.v1 import auth_service_pb2_grpc as pb_grpc


def _start(tmp: Path, n: int) -> tuple[subprocess.Popen[bytes], dict[str, object], Path]:
    ready, log = tmp / f"ready{n}.json", tmp / f"auth{n}.log"
    env = {**os.environ, "LLMESH_LOGGING__JSON": "true"}
    env.pop("LLMESH_DATABASE__URL", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmesh.cli.main", "serve", "auth", "--listen", "127.0.0.1:0",
             "--data-dir", str(tmp / "data"), "--ready-file", str(ready)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc, json.loads(ready.read_text()), ready


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_bootstrap_credentials_go_to_the_supervisor_once_never_the_log(tmp_path: Path) -> None:
    proc, info, ready = _start(tmp_path, 1)
    try:
        boot = info["bootstrap"]
        assert isinstance(boot, dict) and boot["username"] == "admin"
        assert ready.stat().st_mode & 0o077 == 0  # owner only
        with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
            stub = pb_grpc.AuthServiceStub(channel)
            me = stub.GetMe(pb.GetMeRequest(), metadata=(("authorization", f"Bearer {boot['api_key']}"),))
            assert me.user.role == pb.ROLE_ADMIN
            stub.Login(pb.LoginRequest(username="admin", password=boot["password"]))
    finally:
        _stop(proc)
    logged = (tmp_path / "auth1.log").read_text()
    assert boot["password"] not in logged and boot["api_key"] not in logged
    assert "in-process limiter" in logged  # the start-up log says which limiter runs
    proc, info, _ = _start(tmp_path, 2)
    _stop(proc)
    assert "bootstrap" not in info
