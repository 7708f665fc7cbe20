"""API keys in SQL: `llm_<random>`, shown once, stored as HMAC-SHA256 under a server secret.

Why HMAC and not argon2: an API key is 256 random bits, so nobody can guess it from its hash the
way a password can be guessed; a slow hash would only slow every request down. The HMAC's server
secret means a stolen table alone is not even enough to test candidate keys offline. The first 8
characters after `llm_` are a lookup prefix (unique, indexed, shown in listings); the hash is then
compared in constant time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmesh.auth import schema
from llmesh.auth.db import as_utc, guarded, utcnow
from llmesh.auth.principal import NO_LIMITS, Limits
from llmesh.auth.users import check_limits, limits_of, limits_values
from llmesh.common.errors import InvalidRequest, NotFound, Unauthenticated

KEY_PREFIX = "llm_"
LOOKUP_CHARS = 8
MAX_KEY_CHARS = 128
MAX_NAME = 255
MAX_GLOBS = 64
SECRET_NAME = "api_key_hmac"


@dataclass(frozen=True)
class ApiKey:
    """One key's record (never the secret)."""

    key_id: str
    user_id: str
    name: str
    prefix: str
    allowed_models: tuple[str, ...]
    limits: Limits
    expires_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool

    def allows(self, model: str) -> bool:
        return model_allowed(self.allowed_models, model)


def model_allowed(globs: tuple[str, ...], model: str) -> bool:
    """Whether `model` matches one of the globs (an empty list allows every model)."""
    return not globs or any(fnmatch.fnmatchcase(model, g) for g in globs)


def _key(row: sa.Row[object]) -> ApiKey:
    r = row._mapping
    return ApiKey(
        key_id=r["id"],
        user_id=r["user_id"],
        name=r["name"],
        prefix=r["prefix"],
        allowed_models=tuple(r["allowed_models"] or ()),
        limits=limits_of(row),
        expires_at=as_utc(r["expires_at"]),
        created_at=as_utc(r["created_at"]),  # type: ignore[arg-type]
        last_used_at=as_utc(r["last_used_at"]),
        revoked=r["revoked_at"] is not None,
    )


def load_or_create_secret(engine: Engine, configured: str) -> bytes:
    """The HMAC secret: the configured one, or one generated on first start and kept in SQL."""
    if configured:
        return configured.encode()

    def work() -> str:
        with engine.begin() as conn:
            row = conn.execute(
                sa.select(schema.secrets.c.value).where(schema.secrets.c.name == SECRET_NAME)
            ).first()
            if row is not None:
                return str(row.value)
            value = secrets.token_hex(32)
            conn.execute(schema.secrets.insert().values(name=SECRET_NAME, value=value, created_at=utcnow()))
            return value

    try:
        return guarded(engine, work).encode()
    except sa.exc.IntegrityError:
        # Another replica created it first.
        return guarded(engine, work).encode()


class ApiKeyStore:
    """Creates, verifies, lists and revokes API keys."""

    def __init__(self, engine: Engine, secret: bytes) -> None:
        self._engine = engine
        self._secret = secret

    def _hash(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def create(
        self,
        user_id: str,
        *,
        name: str = "",
        allowed_models: tuple[str, ...] = (),
        limits: Limits = NO_LIMITS,
        ttl: timedelta | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key for `user_id`: its record and the secret (returned only here)."""
        if len(name) > MAX_NAME:
            raise InvalidRequest(f"key name is {len(name)} characters; at most {MAX_NAME}")
        if len(allowed_models) > MAX_GLOBS or any(not g or len(g) > MAX_NAME for g in allowed_models):
            raise InvalidRequest(
                f"allowed_models: at most {MAX_GLOBS} non-empty globs of <= {MAX_NAME} chars"
            )
        check_limits(limits)
        now = utcnow()
        for _ in range(5):
            secret = KEY_PREFIX + secrets.token_urlsafe(32)
            values = {
                "id": uuid.uuid4().hex,
                "user_id": user_id,
                "name": name,
                "prefix": secret[: len(KEY_PREFIX) + LOOKUP_CHARS],
                "key_hash": self._hash(secret),
                "allowed_models": list(allowed_models),
                **limits_values(limits),
                "expires_at": now + ttl if ttl else None,
                "created_at": now,
            }

            def work(values: dict[str, object] = values) -> None:
                with self._engine.begin() as conn:
                    conn.execute(schema.api_keys.insert().values(**values))

            try:
                guarded(self._engine, work)
            except sa.exc.IntegrityError:
                continue  # prefix collision (or unknown user, reported below)
            return self.require(str(values["id"])), secret
        raise NotFound(f"cannot create a key for user {user_id!r}: does the user exist?")

    def verify(self, key: str) -> ApiKey:
        """The live key record for a presented secret; Unauthenticated when it is not one."""
        if not key.startswith(KEY_PREFIX) or len(key) > MAX_KEY_CHARS:
            raise Unauthenticated("that is not an llmesh API key (they start with llm_)")
        prefix = key[: len(KEY_PREFIX) + LOOKUP_CHARS]

        def work() -> sa.Row[object] | None:
            with self._engine.connect() as conn:
                return conn.execute(
                    sa.select(schema.api_keys).where(schema.api_keys.c.prefix == prefix)
                ).first()

        row = guarded(self._engine, work)
        if row is None or not hmac.compare_digest(row._mapping["key_hash"], self._hash(key)):
            raise Unauthenticated("the API key is not valid; check it or create a new one")
        record = _key(row)
        if record.revoked:
            raise Unauthenticated(f"API key {record.prefix}... was revoked; create a new one")
        if record.expires_at is not None and record.expires_at <= as_utc(utcnow()):  # type: ignore[operator]
            raise Unauthenticated(f"API key {record.prefix}... has expired; create a new one")
        return record

    def get(self, key_id: str) -> ApiKey | None:
        def work() -> ApiKey | None:
            with self._engine.connect() as conn:
                row = conn.execute(sa.select(schema.api_keys).where(schema.api_keys.c.id == key_id)).first()
            return None if row is None else _key(row)

        return guarded(self._engine, work)

    def require(self, key_id: str) -> ApiKey:
        key = self.get(key_id)
        if key is None:
            raise NotFound(f"API key {key_id!r} does not exist")
        return key

    def list(self, user_id: str) -> list[ApiKey]:
        def work() -> list[ApiKey]:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    sa.select(schema.api_keys)
                    .where(schema.api_keys.c.user_id == user_id)
                    .order_by(schema.api_keys.c.created_at, schema.api_keys.c.id)
                ).all()
            return [_key(r) for r in rows]

        return guarded(self._engine, work)

    def revoke(self, key_id: str) -> bool:
        """Mark revoked; False when it already was."""

        def work() -> int:
            with self._engine.begin() as conn:
                return conn.execute(
                    schema.api_keys.update()
                    .where(schema.api_keys.c.id == key_id, schema.api_keys.c.revoked_at.is_(None))
                    .values(revoked_at=utcnow())
                ).rowcount

        return guarded(self._engine, work) > 0

    def touch(self, key_id: str) -> None:
        """Record a use (coarse: callers do this at most once per cache period)."""

        def work() -> None:
            with self._engine.begin() as conn:
                conn.execute(
                    schema.api_keys.update()
                    .where(schema.api_keys.c.id == key_id)
                    .values(last_used_at=utcnow())
                )

        guarded(self._engine, work)
