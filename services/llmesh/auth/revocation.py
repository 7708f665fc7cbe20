"""Telling every AuthService replica that a key was revoked or a user changed (Redis pub/sub).

Without Redis there is one replica in practice (the embedded default) and the local invalidation
is enough; with several replicas and no Redis, the credential cache TTL bounds the delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmesh.auth.credentials import Authenticator

log = logging.getLogger(__name__)

CHANNEL = "llmesh:auth:invalidate"


class RevocationBus:
    """Publishes invalidations and applies the ones other replicas publish."""

    def __init__(
        self, authenticator: Authenticator, client: aioredis.Redis | None, channel: str = CHANNEL
    ) -> None:
        self._auth = authenticator
        self._redis = client
        self._channel = channel
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        """Subscribe (returns once the subscription is live)."""
        if self._redis is None:
            return
        self._task = asyncio.create_task(self._listen(), name="auth-revocations")
        await asyncio.wait_for(self._subscribed.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def key_revoked(self, key_id: str) -> None:
        self._auth.invalidate_key(key_id)
        await self._publish(f"key:{key_id}")

    async def user_changed(self, user_id: str) -> None:
        self._auth.invalidate_user(user_id)
        await self._publish(f"user:{user_id}")

    async def _publish(self, message: str) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.publish(self._channel, message)
        except (RedisError, OSError):
            # The credential cache TTL still bounds the delay on other replicas.
            log.warning("could not publish an auth invalidation; other replicas catch up by TTL")

    def _apply(self, message: str) -> None:
        kind, _, ident = message.partition(":")
        if kind == "key":
            self._auth.invalidate_key(ident)
        elif kind == "user":
            self._auth.invalidate_user(ident)

    async def _listen(self) -> None:
        assert self._redis is not None
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    self._subscribed.set()
                    async for item in pubsub.listen():
                        if item.get("type") == "message":
                            data = item["data"]
                            self._apply(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError):
                log.warning("auth invalidation subscription lost; resubscribing in 1 s")
                self._subscribed.set()  # start-up must not hang on a Redis blip
                await asyncio.sleep(1)
