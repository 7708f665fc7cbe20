"""Credentials to principals: bearer JWTs and `llm_` API keys, with a short-lived cache.

A resolved credential is cached for `ttl` seconds (the Check path then needs no database), and
dropped at once when this process learns that its key was revoked or its user changed (directly,
or from another replica through `revocation.RevocationBus`). The TTL bounds staleness when no
bus reaches a replica. Failures are cached too, so garbage tokens cannot hammer the database.
Concurrent misses on one credential share one lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from llmesh.auth.apikeys import KEY_PREFIX, ApiKeyStore
from llmesh.auth.principal import Principal
from llmesh.auth.signing import KeyRing
from llmesh.auth.tokens import AccessTokens
from llmesh.auth.users import User, UserStore
from llmesh.common.errors import Unauthenticated

MAX_CACHE_ENTRIES = 100_000
MAX_CREDENTIAL_CHARS = 4096


def credential_from_headers(headers: Sequence[tuple[str, str]] | dict[str, str]) -> str:
    """The credential in `authorization: Bearer ...` or `x-api-key`; "" when there is none."""
    items = headers.items() if isinstance(headers, dict) else headers
    auth = api_key = ""
    for name, value in items:
        lname = name.lower()
        if lname == "authorization":
            auth = value
        elif lname == "x-api-key":
            api_key = value
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization header must be 'Bearer <token or API key>'")
        return token.strip()
    return api_key.strip()


@dataclass
class _Entry:
    principal: Principal | None
    error: str
    expires: float
    key_id: str
    user_id: str


def _principal(user: User, key_id: str = "", **key_fields: object) -> Principal:
    return Principal(
        user_id=user.user_id,
        username=user.username,
        role=user.role,
        tenant=user.tenant,
        key_id=key_id,
        user_limits=user.limits,
        credits=user.credits,
        **key_fields,  # type: ignore[arg-type]
    )


class Authenticator:
    """Resolves credentials; call `invalidate_*` when keys or users change."""

    def __init__(
        self,
        users: UserStore,
        keys: ApiKeyStore,
        access: AccessTokens,
        keyring: KeyRing,
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._users, self._keys, self._access, self._keyring = users, keys, access, keyring
        self._ttl = ttl_s
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[_Entry]] = {}

    async def authenticate(self, credential: str) -> Principal:
        """The principal behind a credential, or Unauthenticated saying what is wrong."""
        if not credential:
            raise Unauthenticated(
                "no credentials: send 'Authorization: Bearer <API key or access token>' (or x-api-key)"
            )
        if len(credential) > MAX_CREDENTIAL_CHARS:
            raise Unauthenticated("the credential is too long to be an API key or an access token")
        digest = hashlib.sha256(credential.encode()).hexdigest()
        entry = self._cache.get(digest)
        if entry is None or entry.expires <= self._clock():
            entry = await self._single_flight(digest, lambda: self._resolve(credential))
        if entry.principal is None:
            raise Unauthenticated(entry.error)
        return entry.principal

    async def _single_flight(self, digest: str, resolve: Callable[[], Awaitable[_Entry]]) -> _Entry:
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            entry = await resolve()
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._cache.clear()
            self._cache[digest] = entry
            future.set_result(entry)
            return entry
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            del self._inflight[digest]

    async def _resolve(self, credential: str) -> _Entry:
        expires = self._clock() + self._ttl
        try:
            if credential.startswith(KEY_PREFIX):
                principal = await asyncio.to_thread(self._resolve_key, credential)
            else:
                principal = await self._resolve_jwt(credential)
        except Unauthenticated as e:
            return _Entry(None, e.message, expires, "", "")
        return _Entry(principal, "", expires, principal.key_id, principal.user_id)

    def _resolve_key(self, secret: str) -> Principal:
        key = self._keys.verify(secret)
        user = self._users.get(key.user_id)
        if user is None or user.disabled:
            raise Unauthenticated("the API key's user is disabled or gone; ask an admin")
        self._keys.touch(key.key_id)
        return _principal(user, key.key_id, allowed_models=key.allowed_models, key_limits=key.limits)

    async def _resolve_jwt(self, token: str) -> Principal:
        kid = self._access.kid_of(token)
        if kid is not None and self._keyring.needs_reload(kid):
            await asyncio.to_thread(self._keyring.reload)
        claims = self._access.verify(token)
        user = await asyncio.to_thread(self._users.get, claims.user_id)
        if user is None or user.disabled:
            raise Unauthenticated("the token's user is disabled or gone; ask an admin")
        return _principal(user)

    def invalidate_key(self, key_id: str) -> None:
        """Forget every cached resolution of this key."""
        self._drop(lambda e: e.key_id == key_id)

    def invalidate_user(self, user_id: str) -> None:
        """Forget every cached resolution for this user (role, limits, disabled changed)."""
        self._drop(lambda e: e.user_id == user_id)

    def _drop(self, match: Callable[[_Entry], bool]) -> None:
        for digest in [d for d, e in self._cache.items() if match(e)]:
            self._cache.pop(digest, None)
