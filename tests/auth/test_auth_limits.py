"""Admission limits and settlement, on the in-process limiter and on the real Redis."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import code_pb2

from llmesh.auth.limiter import (
    BudgetUnseeded,
    LimitExceeded,
    Reservation,
    Scope,
    period_of,
)
from llmesh.auth.principal import Limits
from llmesh.auth.request_body import demand_of
from llmesh.auth.v1 import auth_service_pb2 as pb
from tests.auth.conftest import AuthClient, AuthFactory, bearer, check_request, grpc_frame, header_map
from tests.auth.test_auth_ext_authz import CHAT, _user_key, chat


def _res(rid: str, limits: Limits, tokens: int = 10) -> Reservation:
    return Reservation(
        request_id=rid, scopes=(Scope("k:test", limits),), tokens=tokens, prompt_tokens=2, user_id="u"
    )


async def test_refused_requests_do_not_consume_rpm(fake_clock_limiter) -> None:  # type: ignore[no-untyped-def]
    limiter, clock = fake_clock_limiter
    lim = Limits(rpm=2)
    await limiter.reserve(_res("a", lim), timeout_s=60)
    clock.now += 10
    await limiter.reserve(_res("b", lim), timeout_s=60)
    for i in range(20):  # refused all minute long
        clock.now += 2
        with pytest.raises(LimitExceeded) as refused:
            await limiter.reserve(_res(f"r{i}", lim), timeout_s=60)
        assert refused.value.limit == "rpm" and refused.value.retry_after_s >= 1
    clock.now += 10.5  # "a" left the window (70.5 s after it), "b" has not
    await limiter.reserve(_res("c", lim), timeout_s=60)
    with pytest.raises(LimitExceeded):
        await limiter.reserve(_res("d", lim), timeout_s=60)


async def test_tpm_budget_parallel_reserve_then_settle(fake_clock_limiter) -> None:  # type: ignore[no-untyped-def]
    limiter, clock = fake_clock_limiter
    lim = Limits(tpm=100, budget_tokens=150, budget_period="day", max_parallel=2)
    with pytest.raises(BudgetUnseeded) as unseeded:  # a budget counter starts from the ledger
        await limiter.reserve(_res("a", lim, 60), timeout_s=60)
    assert unseeded.value.period_id == period_of("day", clock.now)[0] == "d20270115"
    await limiter.seed_budget("k:test", unseeded.value.period_id, 0)
    await limiter.seed_budget("k:test", unseeded.value.period_id, 9999)  # only the first seed counts
    await limiter.reserve(_res("a", lim, 60), timeout_s=60)
    with pytest.raises(LimitExceeded) as tpm:
        await limiter.reserve(_res("b", lim, 60), timeout_s=60)  # 120 > 100 tokens this minute
    assert tpm.value.limit == "tpm"
    settled = await limiter.settle("a", 20, 0)  # used 20 of the 60 reserved
    assert settled is not None and settled.request_id == "a"
    assert await limiter.settle("a", 20, 0) is None  # settling twice changes nothing
    await limiter.reserve(_res("b", lim, 60), timeout_s=60)  # 20 + 60 <= 100
    clock.now += 120  # a new minute: TPM is free again, budget is not
    await limiter.reserve(_res("c", lim, 60), timeout_s=60)  # budget 20 + 60 + 60 = 140
    with pytest.raises(LimitExceeded) as par:
        await limiter.reserve(_res("d", lim, 5), timeout_s=60)
    assert par.value.limit == "parallel"
    await limiter.settle("b", 60, 0)
    with pytest.raises(LimitExceeded) as budget:
        await limiter.reserve(_res("e", lim, 11), timeout_s=60)  # 140 + 11 > 150
    assert budget.value.limit == "budget" and budget.value.retry_after_s > 60
    await limiter.reserve(_res("e", lim, 10), timeout_s=60)  # exactly 150
    assert {r for r in await limiter.overdue(clock.now + 61)} == {"c", "e"}


async def test_30_concurrent_checks_on_10_rpm_admit_exactly_10(
    make_auth: AuthFactory, limiter_redis: str
) -> None:
    a = await make_auth(redis_url=limiter_redis)
    _, key = await _user_key(a, limits=pb.Limits(requests_per_minute=10))
    request = check_request(CHAT, {"authorization": f"Bearer {key}"}, chat())
    results = await asyncio.gather(*(a.authz.Check(request) for _ in range(30)))
    codes = [r.status.code for r in results]
    assert codes.count(code_pb2.OK) == 10 and codes.count(code_pb2.RESOURCE_EXHAUSTED) == 20
    refused = next(r for r in results if r.status.code != code_pb2.OK)
    assert refused.denied_response.status.code == 429
    assert 1 <= int(header_map(refused)["retry-after"]) <= 60


async def test_two_replicas_share_one_rpm_limit_through_redis(make_auth: AuthFactory, redis_url: str) -> None:
    a = await make_auth(redis_url=redis_url)
    b = await make_auth(redis_url=redis_url)
    _, key = await _user_key(a, limits=pb.Limits(requests_per_minute=10))
    request = check_request(CHAT, {"authorization": f"Bearer {key}"}, chat())
    results = await asyncio.gather(*((a if i % 2 else b).authz.Check(request) for i in range(30)))
    assert [r.status.code for r in results].count(code_pb2.OK) == 10


def _ledger(url: str, key_id: str) -> list[sa.Row]:  # type: ignore[type-arg]
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM auth_usage WHERE key_id = :k"), {"k": key_id}).all()
    engine.dispose()
    return list(rows)


async def _record(
    a: AuthClient, request_id: str, prompt: int, completion: int, outcome: str = "success"
) -> pb.RecordUsageResponse:
    return await a.auth.RecordUsage(
        pb.RecordUsageRequest(
            request_id=request_id, prompt_tokens=prompt, completion_tokens=completion, outcome=outcome
        )
    )


async def test_50_concurrent_streams_never_overspend_a_budget(
    make_auth: AuthFactory, db_url: str, limiter_redis: str
) -> None:
    a = await make_auth(database_url=db_url, redis_url=limiter_redis)
    budget = 2000
    _, key = await _user_key(a, limits=pb.Limits(budget_tokens=budget, budget_period=pb.BUDGET_PERIOD_MONTH))
    body = chat(max_tokens=100, text="count to ten")
    request = check_request(CHAT, {"authorization": f"Bearer {key}"}, body)
    rng = random.Random(7)

    async def stream() -> bool:
        r = await a.authz.Check(request)
        if r.status.code != code_pb2.OK:
            assert r.status.code == code_pb2.RESOURCE_EXHAUSTED
            return False
        await asyncio.sleep(rng.random() * 0.2)  # tokens streaming
        rid = header_map(r)["x-llmesh-request-id"]
        recorded = await _record(a, rid, prompt=10, completion=rng.randint(1, 100))
        assert recorded.recorded
        return True

    admitted = await asyncio.gather(*(stream() for _ in range(50)))
    key_id = header_map(
        await a.authz.Check(
            check_request("/llmesh.model.v1.ModelService/ListModels", {"authorization": f"Bearer {key}"})
        )
    )["x-llmesh-key-id"]
    rows = _ledger(db_url, key_id)
    spent = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    assert len(rows) == sum(admitted) and 0 < sum(admitted) < 50
    assert spent <= budget
    assert budget - spent > 200  # room for the exact-fit probe below
    # Refusals cost nothing: exactly budget - (ledger sum) is left. A request whose worst case is
    # exactly that is admitted; one token more is refused.
    left = budget - spent
    exact = _chat_with_worst_case(left)
    over = _chat_with_worst_case(left + 1)
    auth = {"authorization": f"Bearer {key}"}
    assert (await a.authz.Check(check_request(CHAT, auth, over))).status.code == code_pb2.RESOURCE_EXHAUSTED
    assert (await a.authz.Check(check_request(CHAT, auth, exact))).status.code == code_pb2.OK
    assert (
        await a.authz.Check(check_request(CHAT, auth, _chat_with_worst_case(80)))
    ).status.code == code_pb2.RESOURCE_EXHAUSTED


def _chat_with_worst_case(tokens: int):  # type: ignore[no-untyped-def]
    """A chat request whose reservation (prompt bound + max_tokens) is exactly `tokens`."""
    m = 1
    for _ in range(4):
        got = demand_of(
            CHAT, grpc_frame(chat(max_tokens=m, text="count to ten")), default_max_tokens=1024
        ).tokens
        m += tokens - got
    body = chat(max_tokens=m, text="count to ten")
    assert demand_of(CHAT, grpc_frame(body), default_max_tokens=1024).tokens == tokens
    return body


async def test_record_usage_twice_is_one_row_and_one_charge(
    make_auth: AuthFactory, db_url: str, limiter_redis: str
) -> None:
    a = await make_auth(database_url=db_url, redis_url=limiter_redis)
    user_id, key = await _user_key(a)
    r = await a.authz.Check(check_request(CHAT, {"authorization": f"Bearer {key}"}, chat()))
    headers = header_map(r)
    rid = headers["x-llmesh-request-id"]
    first, second = await asyncio.gather(_record(a, rid, 7, 5), _record(a, rid, 7, 5))
    assert sorted([first.recorded, second.recorded]) == [False, True]
    assert first.credits_charged + second.credits_charged == 12
    third = await _record(a, rid, 999, 999, "error")
    assert not third.recorded and third.credits_charged == 0
    rows = _ledger(db_url, headers["x-llmesh-key-id"])
    assert len(rows) == 1 and (rows[0].prompt_tokens, rows[0].completion_tokens, rows[0].outcome) == (
        7,
        5,
        "success",
    )
    assert rows[0].user_id == user_id and rows[0].model == "tiny-llama"
    me = (await a.auth.GetMe(pb.GetMeRequest(), metadata=bearer(key))).user
    assert me.credits == 1_000_000 - 12


async def test_record_usage_bad_input_changes_nothing(make_auth: AuthFactory) -> None:
    a = await make_auth()
    for req, code in (
        (pb.RecordUsageRequest(request_id=""), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.RecordUsageRequest(request_id="x" * 65, outcome="success"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.RecordUsageRequest(request_id="unknown-id", outcome="success"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.RecordUsageRequest(request_id="r1", outcome="exploded"), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.auth.RecordUsage(req)
        assert err.value.code() == code


async def test_credits_run_out_and_refusal_costs_nothing(make_auth: AuthFactory, limiter_redis: str) -> None:
    a = await make_auth(redis_url=limiter_redis, default_credits=1000)
    _, key = await _user_key(a)
    auth = {"authorization": f"Bearer {key}"}
    big = await a.authz.Check(check_request(CHAT, auth, chat(max_tokens=2000)))
    assert big.status.code == code_pb2.RESOURCE_EXHAUSTED and "credits" in big.denied_response.body
    ok = await a.authz.Check(check_request(CHAT, auth, chat(max_tokens=900)))
    assert ok.status.code == code_pb2.OK
    await _record(a, header_map(ok)["x-llmesh-request-id"], 10, 90)
    me = (await a.auth.GetMe(pb.GetMeRequest(), metadata=bearer(key))).user
    assert me.credits == 900


async def test_unsettled_reservation_is_swept_after_timeout(
    make_auth: AuthFactory, limiter_redis: str, sqlite_url: str
) -> None:
    a = await make_auth(redis_url=limiter_redis, reservation_timeout_seconds=0.4)
    _, key = await _user_key(a, limits=pb.Limits(budget_tokens=5000, budget_period=pb.BUDGET_PERIOD_DAY))
    r = await a.authz.Check(check_request(CHAT, {"authorization": f"Bearer {key}"}, chat(max_tokens=1000)))
    headers = header_map(r)
    for _ in range(40):
        await asyncio.sleep(0.1)
        rows = _ledger(sqlite_url, headers["x-llmesh-key-id"])
        if rows:
            break
    assert len(rows) == 1 and rows[0].outcome == "expired" and rows[0].completion_tokens == 0
    prompt_estimate = demand_of(
        CHAT, grpc_frame(chat(max_tokens=1000)), default_max_tokens=1024
    ).prompt_tokens
    assert rows[0].prompt_tokens == prompt_estimate
    late = await _record(a, headers["x-llmesh-request-id"], 50, 50)
    assert not late.recorded  # the sweep already wrote its row


async def test_get_usage_admins_see_all_users_only_themselves(make_auth: AuthFactory, db_url: str) -> None:
    a = await make_auth(database_url=db_url)
    u1, k1 = await _user_key(a, "ivan")
    u2, k2 = await _user_key(a, "judy")
    for key, n in ((k1, 2), (k2, 3)):
        for _ in range(n):
            r = await a.authz.Check(check_request(CHAT, {"authorization": f"Bearer {key}"}, chat()))
            await _record(a, header_map(r)["x-llmesh-request-id"], 3, 4)
    mine = (await a.auth.GetUsage(pb.GetUsageRequest(), metadata=bearer(k1))).rows
    assert len(mine) == 1 and mine[0].user_id == u1 and mine[0].requests == 2 and mine[0].prompt_tokens == 6
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.auth.GetUsage(pb.GetUsageRequest(user_id=u2), metadata=bearer(k1))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    everyone = (await a.auth.GetUsage(pb.GetUsageRequest(), metadata=bearer(a.admin_key))).rows
    assert {(r.user_id, r.requests) for r in everyone} == {(u1, 2), (u2, 3)}
    judy = (
        await a.auth.GetUsage(
            pb.GetUsageRequest(user_id=u2, model="tiny-llama"), metadata=bearer(a.admin_key)
        )
    ).rows
    assert [r.completion_tokens for r in judy] == [12]
    none = (
        await a.auth.GetUsage(
            pb.GetUsageRequest(start_date="2000-01-01", end_date="2000-01-02"), metadata=bearer(a.admin_key)
        )
    ).rows
    assert list(none) == []
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await a.auth.GetUsage(pb.GetUsageRequest(start_date="yesterday"), metadata=bearer(a.admin_key))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_budget_survives_a_restart_and_a_lost_redis(
    make_auth: AuthFactory, sqlite_url: str, limiter_redis: str
) -> None:
    """Budget counters start from the ledger, so a new process (or an emptied Redis) does not reset them."""
    a = await make_auth(redis_url=limiter_redis)
    _, key = await _user_key(a, limits=pb.Limits(budget_tokens=1000, budget_period=pb.BUDGET_PERIOD_MONTH))
    auth = {"authorization": f"Bearer {key}"}
    r = await a.authz.Check(check_request(CHAT, auth, _chat_with_worst_case(700)))
    await _record(a, header_map(r)["x-llmesh-request-id"], 100, 500)  # 600 spent
    await a.running.stop(None)
    # A new replica with fresh counters: in-process ones, or a Redis prefix nothing was written to.
    b = await make_auth(redis_url=limiter_redis, shared_ns=False)
    refused = await b.authz.Check(check_request(CHAT, auth, _chat_with_worst_case(401)))
    assert refused.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert (
        await b.authz.Check(check_request(CHAT, auth, _chat_with_worst_case(400)))
    ).status.code == code_pb2.OK
