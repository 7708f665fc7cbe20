"""Token signing keys in SQL: generation (Ed25519 or RSA), rotation, the JWKS.

A rotated key stops signing at once but keeps verifying until every access token it signed has
expired (retired_at + the access token lifetime); the JWKS lists exactly the keys that verify.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm
from sqlalchemy.engine import Engine

from llmesh.auth import schema
from llmesh.auth.db import guarded, utcnow
from llmesh.common.config import ConfigError

log = logging.getLogger(__name__)

ALGORITHMS = ("EdDSA", "RS256")


@dataclass(frozen=True)
class SigningKey:
    """One key: the private key (for the active one), the public key and its JWK."""

    kid: str
    algorithm: str
    private_key: Any
    public_key: Any
    jwk: dict[str, str]
    retired: bool


def _new_key(algorithm: str) -> tuple[Any, dict[str, str]]:
    if algorithm == "EdDSA":
        private: Any = ed25519.Ed25519PrivateKey.generate()
        jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    elif algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    else:
        raise ConfigError(f"auth.jwt_algorithm {algorithm!r} is not one of {list(ALGORITHMS)}")
    return private, jwk


def _load(row: sa.Row[Any]) -> SigningKey:
    private = serialization.load_pem_private_key(row.private_pem.encode(), password=None)
    return SigningKey(
        kid=row.kid,
        algorithm=row.algorithm,
        private_key=private,
        public_key=private.public_key(),
        jwk=dict(row.public_jwk),
        retired=row.retired_at is not None,
    )


class KeyRing:
    """The signing keys, cached in memory and reloaded from SQL now and then (other replicas rotate)."""

    RELOAD_S = 30.0
    # An unknown kid reloads at most this often (garbage tokens must not hammer the database).
    MISS_RELOAD_S = 1.0

    def __init__(self, engine: Engine, *, algorithm: str, access_lifetime: timedelta) -> None:
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"auth.jwt_algorithm {algorithm!r} is not one of {list(ALGORITHMS)}")
        self._engine = engine
        self._algorithm = algorithm
        self._lifetime = access_lifetime
        self._keys: dict[str, SigningKey] = {}
        self._active: SigningKey | None = None
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def ensure_active(self) -> SigningKey:
        """Load the keys; create the first one when there is none."""
        self.reload()
        if self._active is None:
            self.rotate()
        assert self._active is not None
        return self._active

    def rotate(self) -> str:
        """A new signing key; the previous active ones retire (and still verify until expiry)."""
        private, jwk = _new_key(self._algorithm)
        kid = uuid.uuid4().hex
        jwk.update({"kid": kid, "alg": self._algorithm, "use": "sig"})
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        now = utcnow()

        def work() -> None:
            with self._engine.begin() as conn:
                conn.execute(
                    schema.signing_keys.update()
                    .where(schema.signing_keys.c.retired_at.is_(None))
                    .values(retired_at=now)
                )
                conn.execute(
                    schema.signing_keys.insert().values(
                        kid=kid,
                        algorithm=self._algorithm,
                        private_pem=pem,
                        public_jwk=jwk,
                        created_at=now,
                        retired_at=None,
                    )
                )

        guarded(self._engine, work)
        log.info("token signing key rotated", extra={"kid": kid, "algorithm": self._algorithm})
        self.reload()
        return kid

    def reload(self) -> None:
        """Read the keys that can still verify a live token."""
        # Slack: another replica may sign with a key for up to RELOAD_S after it was retired.
        cutoff = utcnow() - self._lifetime - timedelta(seconds=2 * self.RELOAD_S)

        def work() -> list[sa.Row[Any]]:
            with self._engine.connect() as conn:
                return list(
                    conn.execute(
                        sa.select(schema.signing_keys)
                        .where(
                            sa.or_(
                                schema.signing_keys.c.retired_at.is_(None),
                                schema.signing_keys.c.retired_at > cutoff,
                            )
                        )
                        .order_by(schema.signing_keys.c.created_at)
                    ).all()
                )

        rows = guarded(self._engine, work)
        keys = {r.kid: _load(r) for r in rows}
        active = [k for k in keys.values() if not k.retired]
        with self._lock:
            self._keys = keys
            self._active = active[-1] if active else None
            self._loaded_at = time.monotonic()

    @property
    def active(self) -> SigningKey:
        if self._active is None:
            raise RuntimeError("KeyRing.ensure_active() was not called")
        return self._active

    def needs_reload(self, kid: str | None = None) -> bool:
        """Whether the cache is stale, or `kid` is unknown and a reload may find it."""
        age = time.monotonic() - self._loaded_at
        if age > self.RELOAD_S:
            return True
        return kid is not None and kid not in self._keys and age > self.MISS_RELOAD_S

    def get(self, kid: str) -> SigningKey | None:
        return self._keys.get(kid)

    def jwks(self) -> list[dict[str, str]]:
        """Public JWKs of every key that may have signed a live token."""
        return [dict(k.jwk) for k in self._keys.values()]
