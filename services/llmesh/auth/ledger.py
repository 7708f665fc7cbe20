"""The usage ledger: one row per request id, written once, with the user's credits charged in the
same transaction (so a repeat can neither add a row nor charge twice)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmesh.auth import schema
from llmesh.auth.db import guarded, utcnow
from llmesh.common.errors import InvalidRequest

# The proto's words, the picker's (rejected before running, worker_failed mid-stream), and the
# sweeper's (expired: nobody reported back before the reservation timeout).
OUTCOMES = ("success", "error", "cancelled", "rejected", "worker_failed", "expired")
MAX_REQUEST_ID = 64


@dataclass(frozen=True)
class UsageRecord:
    """What one request used."""

    request_id: str
    user_id: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    credits: int
    outcome: str
    worker_id: str = ""


@dataclass(frozen=True)
class UsageTotal:
    """Totals for one (day, user, key, model)."""

    day: str
    user_id: str
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    credits: int


def check_request_id(request_id: str) -> None:
    if not request_id or len(request_id) > MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id is required, at most {MAX_REQUEST_ID} characters")


def check_day(value: str, name: str) -> None:
    if value:
        try:
            datetime.strptime(value, "%Y-%m-%d")
        except ValueError:
            raise InvalidRequest(f"{name} {value[:32]!r} is not a date (YYYY-MM-DD)") from None


class Ledger:
    """Writes and sums usage rows."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def record(self, usage: UsageRecord) -> bool:
        """Insert the row and charge the credits; False (nothing changed) when the id was recorded."""
        check_request_id(usage.request_id)
        now = utcnow()
        row = {
            **usage.__dict__,
            "day": now.replace(tzinfo=UTC).strftime("%Y-%m-%d"),
            "created_at": now,
            "model": usage.model[: schema.NAME_LEN],
            "worker_id": usage.worker_id[: schema.NAME_LEN],
        }

        def work() -> None:
            with self._engine.begin() as conn:
                conn.execute(schema.usage.insert().values(**row))
                if usage.credits:
                    conn.execute(
                        schema.users.update()
                        .where(schema.users.c.id == usage.user_id, schema.users.c.credits.is_not(None))
                        .values(credits=schema.users.c.credits - usage.credits)
                    )

        try:
            guarded(self._engine, work)
        except sa.exc.IntegrityError:
            return False
        return True

    def spent(self, *, user_id: str = "", key_id: str = "", since_day: str = "") -> int:
        """Tokens a user or key used from `since_day` on ("" for all time): seeds budget counters."""
        u = schema.usage
        query = sa.select(sa.func.sum(u.c.prompt_tokens + u.c.completion_tokens))
        query = query.where(u.c.key_id == key_id) if key_id else query.where(u.c.user_id == user_id)
        if since_day:
            query = query.where(u.c.day >= since_day)

        def work() -> int:
            with self._engine.connect() as conn:
                return int(conn.execute(query).scalar() or 0)

        return guarded(self._engine, work)

    def get(self, request_id: str) -> UsageRecord | None:
        def work() -> sa.Row[object] | None:
            with self._engine.connect() as conn:
                return conn.execute(
                    sa.select(schema.usage).where(schema.usage.c.request_id == request_id)
                ).first()

        row = guarded(self._engine, work)
        if row is None:
            return None
        m = row._mapping
        return UsageRecord(**{f: m[f] for f in UsageRecord.__dataclass_fields__})

    def totals(
        self, *, user_id: str = "", key_id: str = "", model: str = "", start: str = "", end: str = ""
    ) -> list[UsageTotal]:
        """Sums grouped by day, user, key and model, filtered by what is set."""
        check_day(start, "start_date")
        check_day(end, "end_date")
        u = schema.usage
        query = sa.select(
            u.c.day,
            u.c.user_id,
            u.c.key_id,
            u.c.model,
            sa.func.count().label("requests"),
            sa.func.sum(u.c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(u.c.completion_tokens).label("completion_tokens"),
            sa.func.sum(u.c.credits).label("credits"),
        ).group_by(u.c.day, u.c.user_id, u.c.key_id, u.c.model)
        for column, value in ((u.c.user_id, user_id), (u.c.key_id, key_id), (u.c.model, model)):
            if value:
                query = query.where(column == value)
        if start:
            query = query.where(u.c.day >= start)
        if end:
            query = query.where(u.c.day <= end)
        query = query.order_by(u.c.day, u.c.user_id, u.c.key_id, u.c.model)

        def work() -> list[UsageTotal]:
            with self._engine.connect() as conn:
                return [
                    UsageTotal(
                        day=r.day,
                        user_id=r.user_id,
                        key_id=r.key_id,
                        model=r.model,
                        requests=int(r.requests),
                        prompt_tokens=int(r.prompt_tokens or 0),
                        completion_tokens=int(r.completion_tokens or 0),
                        credits=int(r.credits or 0),
                    )
                    for r in conn.execute(query).all()
                ]

        return guarded(self._engine, work)
