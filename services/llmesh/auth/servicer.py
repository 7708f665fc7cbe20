"""AuthService RPCs: accounts and tokens, API keys, admin user management, admission and usage.

The caller of an RPC that needs one is authenticated from the call's own `authorization` (or
`x-api-key`) metadata, which Envoy forwards: AuthService does not trust identity headers. The
internal RPCs (Authenticate, Admit, RecordUsage) are only reachable inside the mesh.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import timedelta

from grpc import aio

from llmesh.auth.admission import Admission, Usage
from llmesh.auth.apikeys import ApiKeyStore
from llmesh.auth.convert import (
    ROLE_FROM_PROTO,
    key_to_proto,
    limits_from_proto,
    principal_to_proto,
    usage_to_proto,
    user_to_proto,
)
from llmesh.auth.credentials import Authenticator, credential_from_headers
from llmesh.auth.passwords import verify_password
from llmesh.auth.principal import Limits, Principal
from llmesh.auth.request_body import Demand
from llmesh.auth.revocation import RevocationBus
from llmesh.auth.signing import KeyRing
from llmesh.auth.tokens import AccessTokens, RefreshTokens
from llmesh.auth.users import MAX_PASSWORD, UserStore
from llmesh.auth.v1 import auth_service_pb2 as pb
from llmesh.auth.v1 import auth_service_pb2_grpc as pb_grpc
from llmesh.common.errors import Forbidden, InvalidRequest, NotFound, Unauthenticated

MAX_PAGE = 1000
MAX_ID = 64


@dataclass(frozen=True)
class NewUserDefaults:
    """What a registered user starts with."""

    credits: int | None
    limits: Limits


def _check_id(value: str, name: str) -> None:
    if len(value) > MAX_ID:
        raise InvalidRequest(f"{name} is {len(value)} characters; ids are at most {MAX_ID}")


class AuthServicer(pb_grpc.AuthServiceServicer):
    """Serves llmesh.auth.v1.AuthService."""

    def __init__(
        self,
        *,
        users: UserStore,
        keys: ApiKeyStore,
        keyring: KeyRing,
        access: AccessTokens,
        refresh: RefreshTokens,
        authenticator: Authenticator,
        admission: Admission,
        bus: RevocationBus,
        defaults: NewUserDefaults,
        allow_registration: bool,
    ) -> None:
        self._users, self._keys, self._keyring = users, keys, keyring
        self._access, self._refresh = access, refresh
        self._auth, self._admission, self._bus = authenticator, admission, bus
        self._defaults = defaults
        self._allow_registration = allow_registration

    async def _caller(self, context: aio.ServicerContext) -> Principal:
        metadata = [
            (k, v if isinstance(v, str) else v.decode()) for k, v in context.invocation_metadata() or ()
        ]
        return await self._auth.authenticate(credential_from_headers(metadata))

    async def _admin(self, context: aio.ServicerContext) -> Principal:
        caller = await self._caller(context)
        if not caller.is_admin:
            raise Forbidden("this RPC needs the admin role")
        return caller

    async def _owner(self, context: aio.ServicerContext, user_id: str) -> tuple[Principal, str]:
        """The caller and the user it acts on: itself, or anyone for an admin."""
        _check_id(user_id, "user_id")
        caller = await self._caller(context)
        if user_id and user_id != caller.user_id and not caller.is_admin:
            raise Forbidden("only admins may act on other users")
        return caller, user_id or caller.user_id

    async def _pair(self, user_id: str, role: str, family: str = "") -> pb.TokenPair:
        refresh = await asyncio.to_thread(self._refresh.issue, user_id, family)
        return pb.TokenPair(
            access_token=self._access.issue(user_id, role),
            refresh_token=refresh,
            token_type="Bearer",
            expires_in=self._access.lifetime_s,
        )

    # ---------------------------------------------------------------- accounts and tokens

    async def Register(
        self, request: pb.RegisterRequest, context: aio.ServicerContext
    ) -> pb.RegisterResponse:
        """Create a user (anyone when registration is open, else admins only)."""
        if not self._allow_registration:
            await self._admin(context)
        user = await asyncio.to_thread(
            self._users.create,
            request.username,
            request.password,
            credits=self._defaults.credits,
            limits=self._defaults.limits,
        )
        return pb.RegisterResponse(user=user_to_proto(user))

    async def Login(self, request: pb.LoginRequest, context: aio.ServicerContext) -> pb.LoginResponse:
        """Username and password to a token pair; one message for any wrong combination."""
        if len(request.username) > 64 or len(request.password) > MAX_PASSWORD:
            raise InvalidRequest("username or password is longer than any account's")
        user = await asyncio.to_thread(self._users.get_by_name, request.username)
        ok = await asyncio.to_thread(verify_password, user.password_hash if user else None, request.password)
        if user is None or not ok:
            raise Unauthenticated("wrong username or password")
        if user.disabled:
            raise Unauthenticated("this account is disabled; ask an admin")
        return pb.LoginResponse(tokens=await self._pair(user.user_id, user.role))

    async def Refresh(self, request: pb.RefreshRequest, context: aio.ServicerContext) -> pb.RefreshResponse:
        """Spend a refresh token for a new pair (reuse revokes the whole login)."""
        user_id, family = await asyncio.to_thread(self._refresh.consume, request.refresh_token)
        user = await asyncio.to_thread(self._users.get, user_id)
        if user is None or user.disabled:
            raise Unauthenticated("this account is disabled; ask an admin")
        return pb.RefreshResponse(tokens=await self._pair(user.user_id, user.role, family))

    async def Logout(self, request: pb.LogoutRequest, context: aio.ServicerContext) -> pb.LogoutResponse:
        """Revoke the refresh token (and every token rotated from the same login)."""
        await asyncio.to_thread(self._refresh.revoke, request.refresh_token)
        return pb.LogoutResponse()

    async def GetMe(self, request: pb.GetMeRequest, context: aio.ServicerContext) -> pb.GetMeResponse:
        """The caller's account."""
        caller = await self._caller(context)
        user = await asyncio.to_thread(self._users.require, caller.user_id)
        return pb.GetMeResponse(user=user_to_proto(user))

    async def GetJwks(self, request: pb.GetJwksRequest, context: aio.ServicerContext) -> pb.GetJwksResponse:
        """Public keys of every signing key that may have signed a live token."""
        if self._keyring.needs_reload():
            await asyncio.to_thread(self._keyring.reload)
        keys = [
            pb.Jwk(**{f: str(v) for f, v in jwk.items() if f in pb.Jwk.DESCRIPTOR.fields_by_name})
            for jwk in self._keyring.jwks()
        ]
        return pb.GetJwksResponse(keys=keys)

    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, context: aio.ServicerContext
    ) -> pb.RotateSigningKeyResponse:
        """New signing key (admin); old keys keep verifying until their tokens expire."""
        await self._admin(context)
        return pb.RotateSigningKeyResponse(kid=await asyncio.to_thread(self._keyring.rotate))

    # ---------------------------------------------------------------- API keys

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: aio.ServicerContext
    ) -> pb.CreateApiKeyResponse:
        """A new key for the caller (or, for admins, anyone); the secret is in this response only."""
        _, user_id = await self._owner(context, request.user_id)
        await asyncio.to_thread(self._users.require, user_id)
        key, secret = await asyncio.to_thread(
            self._keys.create,
            user_id,
            name=request.name,
            allowed_models=tuple(request.allowed_models),
            limits=limits_from_proto(request.limits),
            ttl=timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else None,
        )
        return pb.CreateApiKeyResponse(key=key_to_proto(key), secret=secret)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: aio.ServicerContext
    ) -> pb.ListApiKeysResponse:
        """The keys of the caller (or, for admins, of anyone)."""
        _, user_id = await self._owner(context, request.user_id)
        keys = await asyncio.to_thread(self._keys.list, user_id)
        return pb.ListApiKeysResponse(keys=[key_to_proto(k) for k in keys])

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: aio.ServicerContext
    ) -> pb.RevokeApiKeyResponse:
        """Revoke a key; every replica's cache drops it at once (Redis) or within the cache TTL."""
        _check_id(request.key_id, "key_id")
        if not request.key_id:
            raise InvalidRequest("key_id is required (see ListApiKeys)")
        caller = await self._caller(context)
        key = await asyncio.to_thread(self._keys.get, request.key_id)
        if key is None or (key.user_id != caller.user_id and not caller.is_admin):
            raise NotFound(f"API key {request.key_id!r} does not exist")
        await asyncio.to_thread(self._keys.revoke, key.key_id)
        await self._bus.key_revoked(key.key_id)
        return pb.RevokeApiKeyResponse()

    # ---------------------------------------------------------------- users (admin)

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: aio.ServicerContext
    ) -> pb.ListUsersResponse:
        """Users, a page at a time (admin)."""
        await self._admin(context)
        size = min(request.page_size or 100, MAX_PAGE)
        _check_id(request.page_token, "page_token")
        users = await asyncio.to_thread(self._users.list, limit=size, after=request.page_token)
        token = users[-1].user_id if len(users) == size else ""
        return pb.ListUsersResponse(users=[user_to_proto(u) for u in users], next_page_token=token)

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: aio.ServicerContext
    ) -> pb.UpdateUserResponse:
        """Role, credits, limits, disabled (admin)."""
        await self._admin(context)
        _check_id(request.user_id, "user_id")
        before = await asyncio.to_thread(self._users.require, request.user_id)
        limits = None
        if request.HasField("limits"):
            limits = limits_from_proto(request.limits)
        user = await asyncio.to_thread(
            self._users.update,
            request.user_id,
            role=ROLE_FROM_PROTO.get(request.role),
            add_credits=request.add_credits if before.credits is not None else 0,
            limits=limits,
            disabled=request.disabled if request.HasField("disabled") else None,
        )
        if request.add_credits and before.credits is not None:
            await self._admission.limiter.add_credits(user.user_id, request.add_credits)
        await self._bus.user_changed(user.user_id)
        return pb.UpdateUserResponse(user=user_to_proto(user))

    # ---------------------------------------------------------------- internal

    async def Authenticate(
        self, request: pb.AuthenticateRequest, context: aio.ServicerContext
    ) -> pb.AuthenticateResponse:
        """A credential ("Bearer ..." or a bare key) to its principal."""
        credential = request.credential.strip()
        if credential.lower().startswith("bearer "):
            credential = credential[7:].strip()
        principal = await self._auth.authenticate(credential)
        return pb.AuthenticateResponse(principal=principal_to_proto(principal), cache_ttl_seconds=1)

    async def Admit(self, request: pb.AdmitRequest, context: aio.ServicerContext) -> pb.AdmitResponse:
        """Reserve `estimated_tokens` for a request (for callers that do not go through Envoy)."""
        _check_id(request.principal.user_id, "principal.user_id")
        _check_id(request.principal.key_id, "principal.key_id")
        principal = await asyncio.to_thread(
            self._principal_of, request.principal.user_id, request.principal.key_id
        )
        request_id = request.request_id or uuid.uuid4().hex
        await self._admission.admit(principal, request_id, Demand(request.model, 0, request.estimated_tokens))
        return pb.AdmitResponse()

    def _principal_of(self, user_id: str, key_id: str) -> Principal:
        user = self._users.get(user_id)
        if user is None or user.disabled:
            raise Unauthenticated(f"user {user_id!r} does not exist or is disabled")
        if not key_id:
            return Principal(
                user.user_id,
                user.username,
                user.role,
                user.tenant,
                user_limits=user.limits,
                credits=user.credits,
            )
        key = self._keys.get(key_id)
        if key is None or key.user_id != user.user_id or key.revoked:
            raise Unauthenticated(f"API key {key_id!r} is not a live key of user {user_id!r}")
        return Principal(
            user.user_id,
            user.username,
            user.role,
            user.tenant,
            key_id=key.key_id,
            allowed_models=key.allowed_models,
            user_limits=user.limits,
            key_limits=key.limits,
            credits=user.credits,
        )

    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: aio.ServicerContext
    ) -> pb.RecordUsageResponse:
        """Ledger row and settlement, once per request id (a repeat changes nothing)."""
        recorded, credits = await self._admission.record(
            Usage(
                request_id=request.request_id,
                prompt_tokens=request.prompt_tokens,
                completion_tokens=request.completion_tokens,
                outcome=request.outcome or "success",
                worker_id=request.worker_id,
                user_id=request.principal.user_id,
                key_id=request.principal.key_id,
                model=request.model,
            )
        )
        return pb.RecordUsageResponse(recorded=recorded, credits_charged=credits)

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: aio.ServicerContext
    ) -> pb.GetUsageResponse:
        """Usage totals by day, user, key and model: admins see anyone, users themselves."""
        caller = await self._caller(context)
        for value, name in ((request.user_id, "user_id"), (request.key_id, "key_id")):
            _check_id(value, name)
        if len(request.model) > 255:
            raise InvalidRequest("model is longer than any model name")
        user_id = request.user_id
        if not caller.is_admin:
            if user_id and user_id != caller.user_id:
                raise Forbidden("users may only read their own usage")
            user_id = caller.user_id
        rows = await asyncio.to_thread(
            self._admission.ledger.totals,
            user_id=user_id,
            key_id=request.key_id,
            model=request.model,
            start=request.start_date,
            end=request.end_date,
        )
        return pb.GetUsageResponse(rows=[usage_to_proto(r) for r in rows])
