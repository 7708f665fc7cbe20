"""max_parallel and budget periods (day, week, month, none), on the in-process limiter and the real Redis.

A parallel slot is taken at admission and given back when the request's usage is recorded, however it
ended (success, cancel, dead worker, refused by the picker) or when its reservation times out. Budget
periods are UTC calendar periods; the limiter's clock is injected, so boundaries are crossed without
sleeping.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import code_pb2

from llmesh.auth import migrate, schema
from llmesh.auth.admission import Admission
from llmesh.auth.db import make_engine
from llmesh.auth.ledger import Ledger
from llmesh.auth.limiter import BudgetUnseeded, LimitExceeded, Reservation, Scope
from llmesh.auth.principal import Limits, Principal
from llmesh.auth.request_body import Demand
from llmesh.auth.v1 import auth_service_pb2 as pb
from tests.auth.conftest import AuthClient, AuthFactory, bearer, check_request, header_map
from tests.auth.test_auth_ext_authz import CHAT, _user_key, chat
from tests.auth.test_auth_limits import _ledger, _record

OK = code_pb2.OK
EXHAUSTED = code_pb2.RESOURCE_EXHAUSTED


def _at(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


def _res(rid: str, limits: Limits, tokens: int) -> Reservation:
    return Reservation(
        request_id=rid, scopes=(Scope("k:test", limits),), tokens=tokens, prompt_tokens=1, user_id="u"
    )


async def _admitted(a: AuthClient, key: str) -> str | None:
    """The request id of an admitted chat Check, or None when a limit refused it."""
    response = await a.authz.Check(check_request(CHAT, {"authorization": f"Bearer {key}"}, chat()))
    if response.status.code == OK:
        return header_map(response)["x-llmesh-request-id"]
    assert response.status.code == EXHAUSTED, response.status
    assert response.denied_response.status.code == 429
    return None


async def test_max_parallel_admits_exactly_n_and_the_next_once_one_ends(
    make_auth: AuthFactory, limiter_redis: str
) -> None:
    a = await make_auth(redis_url=limiter_redis)
    n, extra = 3, 4
    _, key = await _user_key(a, limits=pb.Limits(max_parallel=n))
    request = check_request(CHAT, {"authorization": f"Bearer {key}"}, chat())
    results = await asyncio.gather(*(a.authz.Check(request) for _ in range(n + extra)))
    open_ids = [header_map(r)["x-llmesh-request-id"] for r in results if r.status.code == OK]
    refused = [r for r in results if r.status.code != OK]
    assert len(open_ids) == n and len(refused) == extra
    for r in refused:
        assert r.status.code == EXHAUSTED and r.denied_response.status.code == 429
        assert "parallel" in r.denied_response.body and header_map(r)["retry-after"] == "1"
    assert await _admitted(a, key) is None
    # However a request ends, recording its usage gives its slot back: exactly one more is admitted.
    for outcome in ("success", "cancelled", "worker_failed", "rejected"):
        await _record(a, open_ids.pop(0), 5, 1, outcome)
        admitted = await _admitted(a, key)
        assert admitted is not None, outcome
        open_ids.append(admitted)
        assert await _admitted(a, key) is None, outcome
    # A repeated report of an ended request does not free a second slot.
    again = await _record(a, open_ids[-1], 5, 1)
    assert again.recorded and not (await _record(a, open_ids[-1], 5, 1)).recorded
    assert (await _admitted(a, key)) is not None
    assert await _admitted(a, key) is None


async def test_max_parallel_slot_of_a_request_nobody_reports_is_freed_by_the_sweep(
    make_auth: AuthFactory, limiter_redis: str, sqlite_url: str
) -> None:
    a = await make_auth(redis_url=limiter_redis, reservation_timeout_seconds=0.4)
    _, key = await _user_key(a, limits=pb.Limits(max_parallel=1))
    first = await _admitted(a, key)
    assert first is not None and await _admitted(a, key) is None
    key_id = header_map(
        await a.authz.Check(
            check_request("/llmesh.model.v1.ModelService/ListModels", {"authorization": f"Bearer {key}"})
        )
    )["x-llmesh-key-id"]
    for _ in range(60):
        await asyncio.sleep(0.1)
        if _ledger(sqlite_url, key_id):
            break
    assert [r.outcome for r in _ledger(sqlite_url, key_id)] == ["expired"]
    assert await _admitted(a, key) is not None


async def test_user_level_max_parallel_covers_all_their_keys(
    make_auth: AuthFactory, limiter_redis: str
) -> None:
    a = await make_auth(redis_url=limiter_redis)
    user_id, key1 = await _user_key(a)
    key2 = (
        await a.auth.CreateApiKey(pb.CreateApiKeyRequest(user_id=user_id), metadata=bearer(a.admin_key))
    ).secret
    updated = await a.auth.UpdateUser(
        pb.UpdateUserRequest(user_id=user_id, limits=pb.Limits(max_parallel=2)), metadata=bearer(a.admin_key)
    )
    assert updated.user.limits.max_parallel == 2
    assert (await a.auth.GetMe(pb.GetMeRequest(), metadata=bearer(key1))).user.limits.max_parallel == 2
    first, second = await _admitted(a, key1), await _admitted(a, key2)
    assert first and second
    assert await _admitted(a, key1) is None and await _admitted(a, key2) is None
    await _record(a, first, 5, 5)
    assert await _admitted(a, key2) is not None


async def test_limits_round_trip_the_api_and_bad_limits_change_nothing(make_auth: AuthFactory) -> None:
    a = await make_auth()
    user_id, _ = await _user_key(a)
    admin = bearer(a.admin_key)
    weekly = pb.Limits(
        requests_per_minute=60,
        tokens_per_minute=5000,
        budget_tokens=100_000,
        budget_period=pb.BUDGET_PERIOD_WEEK,
        max_parallel=4,
    )
    created = await a.auth.CreateApiKey(
        pb.CreateApiKeyRequest(user_id=user_id, limits=weekly), metadata=admin
    )
    assert created.key.limits == weekly
    listed = (await a.auth.ListApiKeys(pb.ListApiKeysRequest(user_id=user_id), metadata=admin)).keys
    assert [k.limits for k in listed if k.key_id == created.key.key_id] == [weekly]
    for bad, what in (
        (pb.Limits(budget_tokens=10, budget_period=99), "budget_period"),  # type: ignore[arg-type]
        (pb.Limits(max_parallel=2**31), "max_parallel"),
        (pb.Limits(requests_per_minute=2**32 - 1), "max_parallel"),
        (pb.Limits(budget_tokens=2**63), "budget_tokens"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as on_key:
            await a.auth.CreateApiKey(pb.CreateApiKeyRequest(user_id=user_id, limits=bad), metadata=admin)
        assert on_key.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in on_key.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as on_user:
            await a.auth.UpdateUser(pb.UpdateUserRequest(user_id=user_id, limits=bad), metadata=admin)
        assert on_user.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = (await a.auth.ListApiKeys(pb.ListApiKeysRequest(user_id=user_id), metadata=admin)).keys
    assert len(after) == len(listed)
    users = (await a.auth.ListUsers(pb.ListUsersRequest(), metadata=admin)).users
    assert [u.limits for u in users if u.user_id == user_id] == [
        pb.Limits(budget_period=pb.BUDGET_PERIOD_NONE)
    ]


# (period, the last seconds of one period, the first instant of the next, period ids either side)
BOUNDARIES = [
    ("day", _at(2027, 1, 15, 23, 59, 50), "d20270115", "d20270116"),
    # A Sunday: ISO week 53 of 2026 (which began on Monday 2026-12-28) ends at Monday 00:00 UTC.
    ("week", _at(2027, 1, 3, 23, 59, 50), "w202653", "w202701"),
    ("month", _at(2027, 2, 28, 23, 59, 50), "m202702", "m202703"),
]


@pytest.mark.parametrize(("period", "before", "old_id", "new_id"), BOUNDARIES)
async def test_a_budget_resets_at_its_period_boundary(
    fake_clock_limiter,  # type: ignore[no-untyped-def]
    period: str,
    before: float,
    old_id: str,
    new_id: str,
) -> None:
    limiter, clock = fake_clock_limiter
    clock.now = before
    lim = Limits(budget_tokens=100, budget_period=period)
    with pytest.raises(BudgetUnseeded) as unseeded:
        await limiter.reserve(_res("a", lim, 60), timeout_s=600)
    assert unseeded.value.period_id == old_id
    await limiter.seed_budget("k:test", old_id, 30)  # the ledger says 30 were spent this period
    await limiter.reserve(_res("a", lim, 60), timeout_s=600)
    await limiter.settle("a", 50, 0)  # 80 spent
    with pytest.raises(LimitExceeded) as spent:
        await limiter.reserve(_res("b", lim, 21), timeout_s=600)
    assert spent.value.limit == "budget" and spent.value.retry_after_s == pytest.approx(10)
    await limiter.reserve(_res("b", lim, 20), timeout_s=600)  # exactly the rest
    clock.now += 9.5  # still the old period: still spent
    with pytest.raises(LimitExceeded):
        await limiter.reserve(_res("c", lim, 1), timeout_s=600)
    clock.now += 0.5  # the first instant of the next period: a fresh counter from its own ledger sum
    with pytest.raises(BudgetUnseeded) as fresh:
        await limiter.reserve(_res("c", lim, 100), timeout_s=600)
    assert fresh.value.period_id == new_id
    assert fresh.value.since_day == datetime.fromtimestamp(clock.now, UTC).strftime("%Y-%m-%d")
    await limiter.seed_budget("k:test", new_id, 0)
    await limiter.reserve(_res("c", lim, 100), timeout_s=600)  # the whole budget again
    with pytest.raises(LimitExceeded):
        await limiter.reserve(_res("d", lim, 1), timeout_s=600)
    # "b", reserved in the old period, settles there: the new period's counter is untouched.
    await limiter.settle("b", 0, 0)
    with pytest.raises(LimitExceeded):
        await limiter.reserve(_res("d", lim, 1), timeout_s=600)


async def test_a_weekly_budget_spans_new_year_and_a_lifetime_budget_never_resets(
    fake_clock_limiter,  # type: ignore[no-untyped-def]
) -> None:
    limiter, clock = fake_clock_limiter
    weekly, lifetime = Limits(budget_tokens=50, budget_period="week"), Limits(budget_tokens=50)
    clock.now = _at(2026, 12, 31, 12)  # Thursday of ISO week 2026-53
    for lim, scope in ((weekly, "k:test"), (lifetime, "k:life")):
        reservation = Reservation(
            request_id=f"x-{scope}", scopes=(Scope(scope, lim),), tokens=50, prompt_tokens=1, user_id="u"
        )
        with pytest.raises(BudgetUnseeded) as unseeded:
            await limiter.reserve(reservation, timeout_s=60)
        assert unseeded.value.since_day == ("2026-12-28" if lim is weekly else "")
        await limiter.seed_budget(scope, unseeded.value.period_id, 0)
        await limiter.reserve(reservation, timeout_s=60)
    clock.now = _at(2027, 1, 2, 12)  # Saturday, a new calendar year, the same ISO week
    with pytest.raises(LimitExceeded):
        await limiter.reserve(_res("w1", weekly, 1), timeout_s=60)
    clock.now = _at(2027, 1, 4)  # Monday: week 2027-01
    with pytest.raises(BudgetUnseeded):
        await limiter.reserve(_res("w1", weekly, 1), timeout_s=60)
    clock.now = _at(2030, 1, 1)
    life = Reservation(
        request_id="l1", scopes=(Scope("k:life", lifetime),), tokens=1, prompt_tokens=1, user_id="u"
    )
    with pytest.raises(LimitExceeded) as never:
        await limiter.reserve(life, timeout_s=60)
    assert never.value.limit == "budget"


async def test_weekly_budget_is_seeded_from_this_weeks_ledger_rows_only(
    fake_clock_limiter,  # type: ignore[no-untyped-def]
    sqlite_url: str,
) -> None:
    """A fresh counter (new process, lost Redis, new week) starts from the ledger rows of the period
    the limiter's clock is in: last week's spending does not count, this week's does."""
    limiter, clock = fake_clock_limiter
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    monday = datetime(2027, 1, 4, tzinfo=UTC)
    rows = [
        ("last-sunday", monday - timedelta(days=1), 400),
        ("this-monday", monday, 30),
        ("this-wednesday", monday + timedelta(days=2), 40),
    ]
    with engine.begin() as conn:
        for rid, when, tokens in rows:
            conn.execute(
                sa.insert(schema.usage).values(
                    request_id=rid,
                    user_id="u1",
                    key_id="k1",
                    model="m",
                    day=when.strftime("%Y-%m-%d"),
                    prompt_tokens=tokens,
                    completion_tokens=0,
                    credits=0,
                    outcome="success",
                    created_at=when.replace(tzinfo=None),
                )
            )
    admission = Admission(limiter, Ledger(engine), credits_per_token=1.0, reservation_timeout_s=60)
    principal = Principal(
        user_id="u1",
        username="u",
        role="user",
        tenant="",
        key_id="k1",
        key_limits=Limits(budget_tokens=100, budget_period="week"),
    )
    clock.now = (monday + timedelta(days=3)).timestamp()  # Thursday: 70 spent this week
    await admission.admit(principal, "r1", Demand("m", 10, 20))
    with pytest.raises(LimitExceeded):
        await admission.admit(principal, "r2", Demand("m", 0, 1))
    engine.dispose()
