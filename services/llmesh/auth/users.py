"""Users in SQL: create, look up, list, update, credits, and the first-start admin."""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass, replace
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmesh.auth import schema
from llmesh.auth.db import as_utc, guarded, utcnow
from llmesh.auth.passwords import hash_password
from llmesh.auth.principal import NO_LIMITS, PERIODS, ROLE_ADMIN, ROLES, Limits
from llmesh.common.errors import Conflict, InvalidRequest, NotFound

USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{3,64}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # argon2 accepts anything; a cap keeps hashing cheap to refuse
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1


@dataclass(frozen=True)
class User:
    """One user row (never the password hash outside this module and login)."""

    user_id: str
    username: str
    role: str
    credits: int | None
    limits: Limits
    tenant: str
    disabled: bool
    created_at: datetime
    password_hash: str = ""


def check_username(username: str) -> None:
    if not USERNAME.match(username):
        raise InvalidRequest(
            "username must be 3-64 characters of letters, digits and _ . @ - "
            f"(got {len(username)} characters)"
        )


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise InvalidRequest(f"password must be at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise InvalidRequest(f"password must be at most {MAX_PASSWORD} characters")


def check_limits(limits: Limits) -> None:
    counts = (limits.rpm, limits.tpm, limits.max_parallel)
    if min(*counts, limits.budget_tokens) < 0:
        raise InvalidRequest("limits must be >= 0 (0 means no limit)")
    # The columns are SQL INTEGER / BIGINT (signed) on every backend.
    if max(counts) > MAX_INT32 or limits.budget_tokens > MAX_INT64:
        raise InvalidRequest(
            f"limits too large: requests, tokens per minute and max_parallel at most {MAX_INT32}, "
            f"budget_tokens at most {MAX_INT64}"
        )
    if limits.budget_period not in PERIODS:
        raise InvalidRequest(f"budget period {limits.budget_period!r} is not one of {list(PERIODS)}")


def limits_values(limits: Limits) -> dict[str, object]:
    """The limit columns of users and keys."""
    return {
        "rpm": limits.rpm,
        "tpm": limits.tpm,
        "budget_tokens": limits.budget_tokens,
        "budget_period": limits.budget_period,
        "max_parallel": limits.max_parallel,
    }


def limits_of(row: sa.Row[object]) -> Limits:
    return Limits(
        rpm=int(row.rpm),  # type: ignore[attr-defined]
        tpm=int(row.tpm),  # type: ignore[attr-defined]
        budget_tokens=int(row.budget_tokens),  # type: ignore[attr-defined]
        budget_period=str(row.budget_period),  # type: ignore[attr-defined]
        max_parallel=int(row.max_parallel),  # type: ignore[attr-defined]
    )


def _user(row: sa.Row[object]) -> User:
    r = row._mapping
    return User(
        user_id=r["id"],
        username=r["username"],
        role=r["role"],
        credits=None if r["credits"] is None else int(r["credits"]),
        limits=limits_of(row),
        tenant=r["tenant"] or r["id"],
        disabled=bool(r["disabled"]),
        created_at=as_utc(r["created_at"]),  # type: ignore[arg-type]
        password_hash=r["password_hash"],
    )


class UserStore:
    """Users table access. Synchronous; the servicer calls it through asyncio.to_thread."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(
        self,
        username: str,
        password: str,
        *,
        role: str = "user",
        credits: int | None = None,
        limits: Limits = NO_LIMITS,
        tenant: str = "",
    ) -> User:
        """A new user; Conflict when the name is taken. The password is hashed here (argon2id)."""
        check_username(username)
        check_password(password)
        check_limits(limits)
        if role not in ROLES:
            raise InvalidRequest(f"role {role!r} is not one of {list(ROLES)}")
        now = utcnow()
        values = {
            "id": uuid.uuid4().hex,
            "username": username,
            "password_hash": hash_password(password),
            "role": role,
            "credits": credits,
            **limits_values(limits),
            "tenant": tenant,
            "disabled": False,
            "created_at": now,
            "updated_at": now,
        }

        def work() -> None:
            with self._engine.begin() as conn:
                conn.execute(schema.users.insert().values(**values))

        try:
            guarded(self._engine, work)
        except sa.exc.IntegrityError:
            raise Conflict(f"username {username!r} is taken; pick another") from None
        got = self.get(str(values["id"]))
        assert got is not None
        return got

    def get(self, user_id: str) -> User | None:
        def work() -> User | None:
            with self._engine.connect() as conn:
                row = conn.execute(sa.select(schema.users).where(schema.users.c.id == user_id)).first()
            return None if row is None else _user(row)

        return guarded(self._engine, work)

    def get_by_name(self, username: str) -> User | None:
        def work() -> User | None:
            with self._engine.connect() as conn:
                row = conn.execute(sa.select(schema.users).where(schema.users.c.username == username)).first()
            return None if row is None else _user(row)

        return guarded(self._engine, work)

    def require(self, user_id: str) -> User:
        user = self.get(user_id)
        if user is None:
            raise NotFound(f"user {user_id!r} does not exist")
        return user

    def list(self, *, limit: int, after: str = "") -> list[User]:
        """Users ordered by id, `limit` of them after id `after` (keyset pagination)."""

        def work() -> list[User]:
            query = sa.select(schema.users).order_by(schema.users.c.id).limit(limit)
            if after:
                query = query.where(schema.users.c.id > after)
            with self._engine.connect() as conn:
                return [_user(r) for r in conn.execute(query).all()]

        return guarded(self._engine, work)

    def update(
        self,
        user_id: str,
        *,
        role: str | None = None,
        add_credits: int = 0,
        limits: Limits | None = None,
        disabled: bool | None = None,
    ) -> User:
        """Change role, limits, disabled; add credits atomically (a SQL increment, not read-modify-write)."""
        values: dict[str, object] = {"updated_at": utcnow()}
        if role is not None:
            if role not in ROLES:
                raise InvalidRequest(f"role {role!r} is not one of {list(ROLES)}")
            values["role"] = role
        if limits is not None:
            check_limits(limits)
            values.update(limits_values(limits))
        if disabled is not None:
            values["disabled"] = disabled
        if add_credits:
            values["credits"] = schema.users.c.credits + add_credits

        def work() -> int:
            with self._engine.begin() as conn:
                return conn.execute(
                    schema.users.update().where(schema.users.c.id == user_id).values(**values)
                ).rowcount

        if guarded(self._engine, work) == 0:
            raise NotFound(f"user {user_id!r} does not exist")
        return self.require(user_id)

    def ensure_admin(self, username: str, password: str) -> tuple[User, str | None]:
        """The first-start admin: created when no admin exists yet.

        Returns the admin and, when it was just created with a generated password, that password
        (for the operator's terminal, once). Later starts change nothing.
        """

        def existing() -> sa.Row[object] | None:
            with self._engine.connect() as conn:
                return conn.execute(
                    sa.select(schema.users).where(schema.users.c.role == ROLE_ADMIN).limit(1)
                ).first()

        row = guarded(self._engine, existing)
        if row is not None:
            return _user(row), None
        generated = None if password else secrets.token_urlsafe(18)
        try:
            user = self.create(username, password or str(generated), role=ROLE_ADMIN, credits=None)
        except Conflict:
            # Another replica bootstrapped at the same moment, or the name is a plain user's.
            found = self.get_by_name(username)
            if found is None or found.role != ROLE_ADMIN:
                raise Conflict(
                    f"cannot bootstrap admin {username!r}: a non-admin user has that name; "
                    "set auth.admin_username to another name"
                ) from None
            return found, None
        return replace(user, password_hash=""), generated
