"""Access tokens (JWT signed by the KeyRing's active key) and opaque, rotating refresh tokens."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import jwt
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmesh.auth import schema
from llmesh.auth.db import guarded, utcnow
from llmesh.auth.signing import ALGORITHMS, KeyRing
from llmesh.common.errors import Unauthenticated

MAX_TOKEN_CHARS = 4096
REFRESH_PREFIX = "rt_"


@dataclass(frozen=True)
class AccessClaims:
    """What a verified access token says."""

    user_id: str
    role: str
    expires_at: float


class AccessTokens:
    """Issues and verifies access tokens; verification needs only the cached public keys."""

    def __init__(self, keys: KeyRing, *, issuer: str, lifetime: timedelta) -> None:
        self._keys = keys
        self._issuer = issuer
        self._lifetime = lifetime

    @property
    def lifetime_s(self) -> int:
        return int(self._lifetime.total_seconds())

    def issue(self, user_id: str, role: str) -> str:
        key = self._keys.active
        now = int(time.time())
        claims = {
            "iss": self._issuer,
            "sub": user_id,
            "role": role,
            "typ": "access",
            "iat": now,
            "exp": now + self.lifetime_s,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid})

    def kid_of(self, token: str) -> str | None:
        """The token's key id, or None when the header is unreadable."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return None
        return kid if isinstance(kid, str) else None

    def verify(self, token: str) -> AccessClaims:
        """The claims of a valid access token; Unauthenticated for anything else."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("the access token is too long to be one of ours; log in again")
        kid = self.kid_of(token)
        if kid is None:
            raise Unauthenticated("the bearer token is not a JWT or an llmesh API key (llm_...)")
        key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("the token was signed by an unknown or expired key; log in again")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.public_key,
                algorithms=[key.algorithm] if key.algorithm in ALGORITHMS else [],
                issuer=self._issuer,
                options={"require": ["exp", "sub", "iat"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the access token has expired; refresh it or log in again") from None
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"the access token does not verify ({e}); log in again") from None
        if claims.get("typ") != "access":
            raise Unauthenticated("that token is not an access token")
        return AccessClaims(
            user_id=str(claims["sub"]), role=str(claims.get("role", "")), expires_at=claims["exp"]
        )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RefreshTokens:
    """Opaque refresh tokens, stored as SHA-256. Each use rotates; reusing a spent one revokes its family."""

    def __init__(self, engine: Engine, *, lifetime: timedelta) -> None:
        self._engine = engine
        self._lifetime = lifetime

    def issue(self, user_id: str, family_id: str = "") -> str:
        token = REFRESH_PREFIX + secrets.token_urlsafe(32)
        now = utcnow()

        def work() -> None:
            with self._engine.begin() as conn:
                conn.execute(
                    schema.refresh_tokens.insert().values(
                        id=uuid.uuid4().hex,
                        token_hash=_digest(token),
                        user_id=user_id,
                        family_id=family_id or uuid.uuid4().hex,
                        expires_at=now + self._lifetime,
                        created_at=now,
                    )
                )

        guarded(self._engine, work)
        return token

    def consume(self, token: str) -> tuple[str, str]:
        """Spend a refresh token: (user_id, family_id). Unauthenticated when it is not live.

        The spend is a conditional UPDATE (used_at IS NULL), so two concurrent refreshes with one
        token cannot both win; the loser is treated as reuse and the whole family is revoked.
        """
        if not token.startswith(REFRESH_PREFIX) or len(token) > 128:
            raise Unauthenticated("that is not an llmesh refresh token; log in again")
        digest = _digest(token)
        now = utcnow()
        t = schema.refresh_tokens

        def work() -> tuple[str, str] | str:
            with self._engine.begin() as conn:
                row = conn.execute(sa.select(t).where(t.c.token_hash == digest)).first()
                if row is None:
                    return "unknown"
                if row.revoked_at is not None:
                    return "revoked"
                if row.expires_at <= now:
                    return "expired"
                spent = conn.execute(
                    t.update().where(t.c.id == row.id, t.c.used_at.is_(None)).values(used_at=now)
                ).rowcount
                if spent == 0:
                    conn.execute(
                        t.update()
                        .where(t.c.family_id == row.family_id, t.c.revoked_at.is_(None))
                        .values(revoked_at=now)
                    )
                    return "reused"
                return row.user_id, row.family_id

        result = guarded(self._engine, work)
        if isinstance(result, tuple):
            return result
        reasons = {
            "unknown": "the refresh token is not known",
            "revoked": "the refresh token was revoked (logged out)",
            "expired": "the refresh token has expired",
            "reused": "the refresh token was already used; every token of this login is now revoked",
        }
        raise Unauthenticated(f"{reasons[result]}; log in again")

    def revoke(self, token: str) -> bool:
        """Revoke a refresh token and its family (logout); False when it was not live."""
        if not token.startswith(REFRESH_PREFIX) or len(token) > 128:
            raise Unauthenticated("that is not an llmesh refresh token")
        digest = _digest(token)
        now = utcnow()
        t = schema.refresh_tokens

        def work() -> bool:
            with self._engine.begin() as conn:
                row = conn.execute(sa.select(t.c.family_id).where(t.c.token_hash == digest)).first()
                if row is None:
                    return False
                return (
                    conn.execute(
                        t.update()
                        .where(t.c.family_id == row.family_id, t.c.revoked_at.is_(None))
                        .values(revoked_at=now)
                    ).rowcount
                    > 0
                )

        return guarded(self._engine, work)
