"""`llmesh auth create-user / create-key / usage` against a real database and a real AuthService."""

from __future__ import annotations

import pytest
from google.rpc import code_pb2

from llmesh.auth.v1 import auth_service_pb2 as pb
from llmesh.cli.main import main
from tests.auth.conftest import AuthFactory, check_request, header_map
from tests.auth.test_auth_ext_authz import CHAT, chat


async def test_create_key_with_models_and_limits_then_usage(
    make_auth: AuthFactory,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LLMESH_DATABASE__URL", sqlite_url)
    assert main(["auth", "create-user", "kim"]) == 0
    assert "password: " in capsys.readouterr().out
    assert (
        main(
            [
                "auth",
                "create-key",
                "--user",
                "kim",
                "--models",
                "tiny-*",
                "--rpm",
                "2",
                "--budget",
                "50000/month",
            ]
        )
        == 0
    )
    key = capsys.readouterr().out.strip()
    assert key.startswith("llm_") and len(key) > 40
    assert main(["auth", "create-key", "--user", "nobody"]) == 1
    with pytest.raises(SystemExit):
        main(["auth", "create-key", "--user", "kim", "--budget", "lots"])

    a = await make_auth(database_url=sqlite_url)
    auth = {"authorization": f"Bearer {key}"}
    assert (
        await a.authz.Check(check_request(CHAT, auth, chat("other")))
    ).status.code == code_pb2.PERMISSION_DENIED
    first = await a.authz.Check(check_request(CHAT, auth, chat("tiny-llama")))
    assert first.status.code == code_pb2.OK
    assert (await a.authz.Check(check_request(CHAT, auth, chat()))).status.code == code_pb2.OK
    assert (await a.authz.Check(check_request(CHAT, auth, chat()))).status.code == code_pb2.RESOURCE_EXHAUSTED
    rid = header_map(first)["x-llmesh-request-id"]
    await a.auth.RecordUsage(
        pb.RecordUsageRequest(request_id=rid, prompt_tokens=11, completion_tokens=22, outcome="success")
    )

    capsys.readouterr()
    assert main(["auth", "usage", "--user", "kim"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["day", "user", "key", "model", "requests", "prompt", "completion", "credits"]
    assert out[1].split()[1:] == [
        "kim",
        header_map(first)["x-llmesh-key-id"][:8],
        "tiny-llama",
        "1",
        "11",
        "22",
        "33",
    ]


async def test_create_key_with_max_parallel_and_a_weekly_budget(
    make_auth: AuthFactory,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LLMESH_DATABASE__URL", sqlite_url)
    assert main(["auth", "create-user", "lee"]) == 0
    capsys.readouterr()
    argv = ["auth", "create-key", "--user", "lee", "--max-parallel", "1", "--budget", "5000/week"]
    assert main(argv) == 0
    key = capsys.readouterr().out.strip()
    assert main(["auth", "create-key", "--user", "lee", "--max-parallel", "-1"]) == 1
    assert ">= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["auth", "create-key", "--user", "lee", "--budget", "5000/fortnight"])

    a = await make_auth(database_url=sqlite_url)
    keys = (
        await a.auth.ListApiKeys(pb.ListApiKeysRequest(), metadata=(("authorization", f"Bearer {key}"),))
    ).keys
    assert [(k.limits.max_parallel, k.limits.budget_tokens, k.limits.budget_period) for k in keys] == [
        (1, 5000, pb.BUDGET_PERIOD_WEEK)
    ]
    auth = {"authorization": f"Bearer {key}"}
    first = await a.authz.Check(check_request(CHAT, auth, chat()))
    assert first.status.code == code_pb2.OK
    second = await a.authz.Check(check_request(CHAT, auth, chat()))
    assert second.status.code == code_pb2.RESOURCE_EXHAUSTED and "parallel" in second.denied_response.body
    await a.auth.RecordUsage(
        pb.RecordUsageRequest(
            request_id=header_map(first)["x-llmesh-request-id"],
            prompt_tokens=3,
            completion_tokens=4,
            outcome="cancelled",
        )
    )
    assert (await a.authz.Check(check_request(CHAT, auth, chat()))).status.code == code_pb2.OK
