"""Admission counters: RPM, TPM, budget per period, parallel requests and credits, reserved then settled.

Every admission reserves its worst case (prompt estimate + max output tokens) on every scope that
applies (the key and the user), checked and applied in one atomic step: either all counters move
or none do, and a refused request moves nothing (RPM included). Settling replaces the reservation
by the real usage. Two implementations share these semantics: `MemoryLimiter` (one process, the
embedded default) and `RedisLimiter` (Lua scripts, shared by every replica).

Windows: RPM is an exact sliding 60 s log of admitted requests; TPM is the usual two-bucket
sliding-window estimate (this minute plus the previous one weighted by the overlap); budgets
count tokens per calendar period in UTC (day, ISO week, month, or `none` for a lifetime budget).
"""

from __future__ import annotations

import abc
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from llmesh.auth.principal import Limits
from llmesh.common.errors import OverCapacity

# Retry hint for refusals only more money fixes (credits, lifetime budget).
NO_RETRY_S = 3600.0


@dataclass(frozen=True)
class Scope:
    """One level counters are kept at: `k:<key id>` or `u:<user id>`, with its limits."""

    name: str
    limits: Limits


@dataclass(frozen=True)
class Reservation:
    """A request's reserved worst case, until it is settled."""

    request_id: str
    scopes: tuple[Scope, ...]
    tokens: int
    prompt_tokens: int
    user_id: str
    key_id: str = ""
    model: str = ""
    # Credits account (user id) and worst-case cost; "" when the user has unlimited credits.
    credits_account: str = ""
    credits_balance: int = 0
    credits_cost: int = 0
    # Filled by the limiter.
    created_at: float = 0.0
    deadline: float = 0.0
    minute: int = 0
    periods: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reservation:
        scopes = tuple(Scope(name=s["name"], limits=Limits(**s["limits"])) for s in data["scopes"])
        return cls(**{**data, "scopes": scopes})


class LimitExceeded(OverCapacity):
    """A limit refused the request; `limit` says which (rpm, tpm, budget, parallel, credits)."""

    def __init__(self, limit: str, scope: str, retry_after_s: float) -> None:
        what = {
            "rpm": "requests-per-minute limit",
            "tpm": "tokens-per-minute limit",
            "budget": "token budget for this period",
            "parallel": "limit on parallel requests",
            "credits": "token credits",
        }[limit]
        level = "API key" if scope.startswith("k:") else "user"
        super().__init__(
            f"{level} {what} reached; retry after {max(1, round(retry_after_s))} s"
            + (" or ask an admin for more" if limit in ("credits", "budget") else ""),
            retry_after_s=max(1.0, retry_after_s),
        )
        self.limit = limit
        self.scope = scope


class BudgetUnseeded(Exception):
    """A budget counter this limiter does not hold yet (new process, Redis restarted or expired):
    the caller seeds it from the ledger with `Limiter.seed_budget` and reserves again."""

    def __init__(self, scope: Scope, period_id: str, since_day: str) -> None:
        super().__init__(f"budget counter {scope.name}:{period_id} is not seeded")
        self.scope = scope
        self.period_id = period_id
        # First day of the period (the limiter's clock), for the ledger sum; "" for a lifetime budget.
        self.since_day = since_day


def period_start_day(period: str, now: float) -> str:
    """First day (YYYY-MM-DD, UTC) of the budget period containing `now`; "" for a lifetime budget."""
    t = datetime.fromtimestamp(now, UTC)
    if period == "day":
        return t.strftime("%Y-%m-%d")
    if period == "week":
        return (t - timedelta(days=t.weekday())).strftime("%Y-%m-%d")
    if period == "month":
        return t.strftime("%Y-%m-01")
    return ""


def period_of(period: str, now: float) -> tuple[str, float]:
    """(period id, seconds until it ends) for a budget period at time `now` (UTC calendar)."""
    t = datetime.fromtimestamp(now, UTC)
    if period == "day":
        end = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return t.strftime("d%Y%m%d"), (end - t).total_seconds()
    if period == "week":
        start = (t - timedelta(days=t.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        year, week, _ = t.isocalendar()
        return f"w{year}{week:02d}", (start + timedelta(days=7) - t).total_seconds()
    if period == "month":
        first = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (first + timedelta(days=32)).replace(day=1)
        return t.strftime("m%Y%m"), (nxt - t).total_seconds()
    return "all", NO_RETRY_S


def prepared(reservation: Reservation, now: float, timeout_s: float) -> Reservation:
    """The reservation with its clock-derived fields filled in (time, deadline, windows)."""
    periods = {s.name: period_of(s.limits.budget_period, now)[0] for s in reservation.scopes}
    return Reservation(
        **{
            **reservation.__dict__,
            "created_at": now,
            "deadline": now + timeout_s,
            "minute": int(now // 60),
            "periods": periods,
        }
    )


class Limiter(abc.ABC):
    """Atomic reserve/settle over all of a request's scopes."""

    #: Shown in the start-up log.
    description: str = ""

    @abc.abstractmethod
    async def reserve(self, reservation: Reservation, *, timeout_s: float) -> Reservation:
        """Reserve or raise LimitExceeded (nothing changed). A repeated request id is refused.

        Raises BudgetUnseeded (nothing changed) when a budget counter must first be seeded.
        """

    @abc.abstractmethod
    async def seed_budget(self, scope: str, period_id: str, tokens: int) -> None:
        """Start a budget counter at `tokens` (what the ledger says was spent), unless one exists."""

    @abc.abstractmethod
    async def settle(self, request_id: str, tokens: int, credits: int) -> Reservation | None:
        """Replace the reservation by the real usage; None when there is none (already settled)."""

    @abc.abstractmethod
    async def get(self, request_id: str) -> Reservation | None:
        """The open reservation of a request, if any."""

    @abc.abstractmethod
    async def overdue(self, now: float, limit: int = 100) -> list[str]:
        """Request ids whose reservations passed their deadline (nobody settled them)."""

    @abc.abstractmethod
    async def add_credits(self, user_id: str, delta: int) -> None:
        """Mirror a credits change made in SQL into the live balance (if one is held)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""


class MemoryLimiter(Limiter):
    """The in-process limiter: exact for one AuthService replica, nothing shared."""

    description = "in-process limiter (no redis.url configured; limits are per AuthService replica)"

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._rpm: dict[str, deque[float]] = {}
        self._tpm: dict[tuple[str, int], int] = {}
        self._budget: dict[tuple[str, str], int] = {}
        self._parallel: dict[str, int] = {}
        self._credits: dict[str, int] = {}
        self._open: dict[str, Reservation] = {}

    async def reserve(self, reservation: Reservation, *, timeout_s: float) -> Reservation:
        # No await below: the check and the update are one step on the event loop.
        now = self._clock()
        r = prepared(reservation, now, timeout_s)
        if r.request_id in self._open:
            raise OverCapacity(f"request id {r.request_id} already holds a reservation")
        second = now - r.minute * 60
        for s in r.scopes:
            lim = s.limits
            if lim.rpm:
                log = self._rpm.setdefault(s.name, deque())
                while log and log[0] <= now - 60:
                    log.popleft()
                if len(log) >= lim.rpm:
                    raise LimitExceeded("rpm", s.name, log[0] + 60 - now)
            if lim.tpm:
                cur = self._tpm.get((s.name, r.minute), 0)
                prev = self._tpm.get((s.name, r.minute - 1), 0)
                if prev * (1 - second / 60) + cur + r.tokens > lim.tpm:
                    raise LimitExceeded("tpm", s.name, 60 - second)
            if lim.budget_tokens:
                if (s.name, r.periods[s.name]) not in self._budget:
                    raise BudgetUnseeded(s, r.periods[s.name], period_start_day(lim.budget_period, now))
                used = self._budget[(s.name, r.periods[s.name])]
                if used + r.tokens > lim.budget_tokens:
                    raise LimitExceeded("budget", s.name, period_of(lim.budget_period, now)[1])
            if lim.max_parallel and self._parallel.get(s.name, 0) >= lim.max_parallel:
                raise LimitExceeded("parallel", s.name, 1.0)
        if r.credits_account:
            balance = self._credits.setdefault(r.credits_account, r.credits_balance)
            if balance < r.credits_cost:
                raise LimitExceeded("credits", "u:" + r.credits_account, NO_RETRY_S)
            self._credits[r.credits_account] = balance - r.credits_cost
        for s in r.scopes:
            lim = s.limits
            if lim.rpm:
                self._rpm[s.name].append(now)
            if lim.tpm:
                self._tpm[(s.name, r.minute)] = self._tpm.get((s.name, r.minute), 0) + r.tokens
            if lim.budget_tokens:
                k = (s.name, r.periods[s.name])
                self._budget[k] = self._budget.get(k, 0) + r.tokens
            if lim.max_parallel:
                self._parallel[s.name] = self._parallel.get(s.name, 0) + 1
        self._open[r.request_id] = r
        self._forget_old_minutes(r.minute)
        return r

    async def seed_budget(self, scope: str, period_id: str, tokens: int) -> None:
        self._budget.setdefault((scope, period_id), tokens)

    def _forget_old_minutes(self, minute: int) -> None:
        if len(self._tpm) > 4096:
            self._tpm = {k: v for k, v in self._tpm.items() if k[1] >= minute - 1}

    async def settle(self, request_id: str, tokens: int, credits: int) -> Reservation | None:
        r = self._open.pop(request_id, None)
        if r is None:
            return None
        delta = tokens - r.tokens
        for s in r.scopes:
            lim = s.limits
            if lim.tpm and (s.name, r.minute) in self._tpm:
                self._tpm[(s.name, r.minute)] = max(0, self._tpm[(s.name, r.minute)] + delta)
            if lim.budget_tokens:
                k = (s.name, r.periods[s.name])
                self._budget[k] = max(0, self._budget.get(k, 0) + delta)
            if lim.max_parallel:
                self._parallel[s.name] = max(0, self._parallel.get(s.name, 0) - 1)
        if r.credits_account and r.credits_account in self._credits:
            self._credits[r.credits_account] += r.credits_cost - credits
        return r

    async def get(self, request_id: str) -> Reservation | None:
        return self._open.get(request_id)

    async def overdue(self, now: float, limit: int = 100) -> list[str]:
        return [r.request_id for r in self._open.values() if r.deadline <= now][:limit]

    async def add_credits(self, user_id: str, delta: int) -> None:
        if user_id in self._credits:
            self._credits[user_id] += delta

    async def close(self) -> None:
        self._open.clear()
