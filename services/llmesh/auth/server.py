"""AuthService process: migrations, signing keys, the first admin, the limiter, two gRPC services
(llmesh.auth.v1.AuthService and Envoy's envoy.service.auth.v3.Authorization) on one port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc import aio

from llmesh.auth import migrate
from llmesh.auth.admission import Admission
from llmesh.auth.apikeys import ApiKeyStore, load_or_create_secret
from llmesh.auth.credentials import Authenticator
from llmesh.auth.db import make_engine
from llmesh.auth.ext_authz import AuthorizationServicer
from llmesh.auth.ledger import Ledger
from llmesh.auth.limiter import Limiter, MemoryLimiter
from llmesh.auth.principal import Limits
from llmesh.auth.redis_limiter import DEFAULT_PREFIX, RedisLimiter
from llmesh.auth.revocation import CHANNEL, RevocationBus
from llmesh.auth.servicer import AuthServicer, NewUserDefaults
from llmesh.auth.signing import KeyRing
from llmesh.auth.tokens import AccessTokens, RefreshTokens
from llmesh.auth.users import UserStore
from llmesh.auth.v1 import auth_service_pb2 as pb
from llmesh.auth.v1 import auth_service_pb2_grpc as pb_grpc
from llmesh.common.config import AuthConfig, ConfigError, LlmeshConfig
from llmesh.common.metrics import serve_metrics
from llmesh.common.server import RunningServer, serve_until_signal, start_server, write_ready_file

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AuthService"].full_name
EXT_AUTHZ_SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name


@dataclass(frozen=True)
class Bootstrap:
    """The admin created on this start (None fields when it already existed)."""

    username: str
    password: str
    api_key: str


@dataclass(frozen=True)
class AuthServiceConfig:
    """Everything the auth process needs, resolved by the caller."""

    listen: str
    database_url: str
    redis_url: str = ""
    auth: AuthConfig = field(default_factory=AuthConfig)
    max_message_bytes: int = 10 * 1024 * 1024
    shutdown_grace_seconds: float = 10.0
    # Key prefix and channel in Redis (tests isolate themselves with their own).
    redis_prefix: str = DEFAULT_PREFIX
    redis_channel: str = CHANNEL
    # Seconds between sweeps for reservations nobody settled.
    sweep_interval_seconds: float = 30.0
    # Where this process serves Prometheus `/metrics` ("host:port", port 0: any); "": nowhere.
    metrics_listen: str = ""

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ConfigError("auth: database_url is empty; llmesh up uses sqlite:///DATA_DIR/llmesh.db")
        a = self.auth
        if a.access_token_hours <= 0 or a.refresh_token_hours <= 0:
            raise ConfigError("auth: access_token_hours and refresh_token_hours must be > 0")
        if a.credits_per_token < 0 or a.default_max_tokens < 1 or a.reservation_timeout_seconds <= 0:
            raise ConfigError(
                "auth: credits_per_token must be >= 0, default_max_tokens >= 1, reservation_timeout_seconds > 0"
            )
        if a.credential_cache_seconds < 0 or a.credential_cache_seconds > 5:
            raise ConfigError("auth: credential_cache_seconds must be 0..5 (revocation must land within 5 s)")

    @classmethod
    def from_config(cls, cfg: LlmeshConfig, *, listen: str, database_url: str = "") -> AuthServiceConfig:
        return cls(
            listen=listen,
            database_url=database_url or cfg.database.url,
            redis_url=cfg.redis.url,
            auth=cfg.auth,
            max_message_bytes=cfg.server.max_request_bytes,
            shutdown_grace_seconds=cfg.server.shutdown_grace_seconds,
        )


async def _sweep_loop(admission: Admission, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        try:
            await admission.sweep()
        except Exception:
            log.exception("sweeping expired reservations failed; retrying next period")


async def start_auth(
    config: AuthServiceConfig, on_bootstrap: Callable[[Bootstrap], None] | None = None
) -> RunningServer:
    """Migrate, prepare keys and the admin, start both services, then report SERVING."""
    a = config.auth
    await asyncio.to_thread(migrate.upgrade, config.database_url)
    engine = make_engine(config.database_url)
    redis_client = aioredis.Redis.from_url(config.redis_url) if config.redis_url else None
    try:
        secret = await asyncio.to_thread(load_or_create_secret, engine, a.key_secret)
        if not a.key_secret:
            log.warning("auth.key_secret is not set; API keys are hashed with a secret kept in the database")
        access_lifetime = timedelta(hours=a.access_token_hours)
        keyring = KeyRing(engine, algorithm=a.jwt_algorithm, access_lifetime=access_lifetime)
        await asyncio.to_thread(keyring.ensure_active)
        users = UserStore(engine)
        keys = ApiKeyStore(engine, secret)
        admin, password = await asyncio.to_thread(users.ensure_admin, a.admin_username, a.admin_password)
        if password is not None or a.admin_password:
            created_now = password is not None or not await asyncio.to_thread(keys.list, admin.user_id)
            if created_now:
                _, api_key = await asyncio.to_thread(keys.create, admin.user_id, name="bootstrap")
                log.info("admin bootstrapped", extra={"username": admin.username})
                if on_bootstrap is not None:
                    on_bootstrap(Bootstrap(admin.username, password or "(from auth.admin_password)", api_key))
        limiter: Limiter
        if redis_client is not None:
            redis_limiter = RedisLimiter(redis_client, prefix=config.redis_prefix)
            await redis_limiter.ping()
            limiter = redis_limiter
        else:
            limiter = MemoryLimiter()
        log.info("auth limiter: %s", limiter.description)
    except BaseException:
        engine.dispose()
        if redis_client is not None:
            await redis_client.aclose()
        raise
    access = AccessTokens(keyring, issuer=a.issuer, lifetime=access_lifetime)
    refresh = RefreshTokens(engine, lifetime=timedelta(hours=a.refresh_token_hours))
    authenticator = Authenticator(users, keys, access, keyring, ttl_s=a.credential_cache_seconds)
    bus = RevocationBus(authenticator, redis_client, channel=config.redis_channel)
    admission = Admission(
        limiter,
        Ledger(engine),
        credits_per_token=a.credits_per_token,
        reservation_timeout_s=a.reservation_timeout_seconds,
    )
    servicer = AuthServicer(
        users=users,
        keys=keys,
        keyring=keyring,
        access=access,
        refresh=refresh,
        authenticator=authenticator,
        admission=admission,
        bus=bus,
        defaults=NewUserDefaults(
            credits=None if a.default_credits < 0 else a.default_credits,
            limits=Limits(rpm=a.default_rpm, tpm=a.default_tpm, max_parallel=a.default_max_parallel),
        ),
        allow_registration=a.allow_registration,
    )
    ext_authz = AuthorizationServicer(
        authenticator,
        admission,
        allow_registration=a.allow_registration,
        default_max_tokens=a.default_max_tokens,
    )

    def add(server: aio.Server) -> list[str]:
        pb_grpc.add_AuthServiceServicer_to_server(servicer, server)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(ext_authz, server)
        return [SERVICE_NAME, EXT_AUTHZ_SERVICE_NAME]

    try:
        await bus.start()
        running = await start_server("auth", config.listen, add, max_message_bytes=config.max_message_bytes)
    except BaseException:
        await bus.stop()
        await limiter.close()
        engine.dispose()
        raise
    sweeper = asyncio.create_task(
        _sweep_loop(admission, min(config.sweep_interval_seconds, a.reservation_timeout_seconds / 4)),
        name="auth-reservation-sweeper",
    )

    async def shutdown() -> None:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await bus.stop()

    async def close() -> None:
        await limiter.close()
        if redis_client is not None and not isinstance(limiter, RedisLimiter):
            await redis_client.aclose()
        await asyncio.to_thread(engine.dispose)

    running.on_shutdown.append(shutdown)
    running.after_stop.append(close)
    await running.set_serving(True)
    log.info(
        "auth ready",
        extra={"port": running.port, "database": engine.url.render_as_string(hide_password=True)},
    )
    return running


def show_bootstrap(boot: Bootstrap, ready_file: Path | None) -> dict[str, str] | None:
    """Show the first admin's credentials once, never in the log.

    On a terminal they are printed to stderr. Under a supervisor (`llmesh up` passes a ready file
    and sends our output to a log file) they go into the ready file instead, readable by the owner
    only, for the supervisor to print on its terminal and delete.
    """
    if sys.stderr.isatty():
        print(
            "\n=== llmesh: admin account created (shown once; store it now) ===\n"
            f"  username: {boot.username}\n  password: {boot.password}\n  API key:  {boot.api_key}\n",
            file=sys.stderr,
            flush=True,
        )
        return None
    if ready_file is not None:
        return {"username": boot.username, "password": boot.password, "api_key": boot.api_key}
    log.warning(
        "admin %r created, but there is no terminal to show its generated credentials on; set "
        "auth.admin_password, or run `llmesh auth create-key --user %s` for a key",
        boot.username,
        boot.username,
    )
    return None


def write_private_ready_file(path: Path, **info: object) -> None:
    """The ready file, atomically and readable by the owner only (it may carry credentials)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
    tmp.replace(path)


async def serve_auth(config: AuthServiceConfig, ready_file: Path | None = None) -> None:
    """Run until SIGTERM/SIGINT; `ready_file` gets {"port": N} once serving (plus `bootstrap`,
    the first admin's credentials, on the start that created it without a terminal to show them)."""
    shown: list[dict[str, str] | None] = []
    metrics = serve_metrics(config.metrics_listen)
    running = await start_auth(
        config, on_bootstrap=lambda boot: shown.append(show_bootstrap(boot, ready_file))
    )
    bootstrap = next((b for b in shown if b), None)
    if ready_file is not None and bootstrap is not None:
        write_private_ready_file(ready_file, port=running.port, bootstrap=bootstrap, **metrics)
    else:
        write_ready_file(ready_file, port=running.port, **metrics)
    await serve_until_signal(running, config.shutdown_grace_seconds)
