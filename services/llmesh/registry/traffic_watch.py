"""The client side of WatchTrafficWeights: keeps the registry's traffic splits in memory.

A scheduler creates one `TrafficWatch`, calls `start()`, and reads `weights(model)` when it picks a
version for a request: {} means no split (route to any worker of the model), otherwise relative
weights per version label (workers announce theirs in `Worker.model_versions`). Like the worker
watch, it keeps the last splits it knew while the registry is away and re-watches with backoff
after any error; every snapshot replaces what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from grpc import aio

from llmesh.registry.membership import control_channel
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc

log = logging.getLogger(__name__)

Splits = dict[str, dict[str, int]]


class TrafficWatch:
    """Traffic splits (model name -> {version: weight}) kept in step with the registry."""

    def __init__(
        self,
        channel_or_address: aio.Channel | str,
        *,
        on_change: Callable[[Splits], None] | None = None,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        if isinstance(channel_or_address, str):
            self._channel, self._owns_channel = control_channel(channel_or_address), True
        else:
            self._channel, self._owns_channel = channel_or_address, False
        self._stub = registry_grpc.RegistryServiceStub(self._channel)
        self._on_change = on_change
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._splits: Splits = {}
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()
        """Set once the first snapshot arrived."""
        self.snapshots = 0

    def weights(self, model: str) -> dict[str, int]:
        """The split of one model (by catalog name); {} when it has none."""
        return dict(self._splits.get(model, {}))

    def splits(self) -> Splits:
        """Every split in force."""
        return {m: dict(w) for m, w in self._splits.items()}

    def start(self) -> None:
        """Watch in the background until `stop()`."""
        self._task = asyncio.create_task(self._run(), name="traffic-watch")

    async def stop(self) -> None:
        """Stop watching and close an owned channel."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._owns_channel:
            await self._channel.close(None)

    async def _run(self) -> None:
        backoff = self._initial_backoff_s
        while True:
            before = self.snapshots
            try:
                async for event in self._stub.WatchTrafficWeights(registry_pb2.WatchTrafficWeightsRequest()):
                    self._apply(event)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                detail = f"{e.code().name}: {e.details()}" if isinstance(e, aio.AioRpcError) else repr(e)
                log.warning(
                    "traffic watch failed (%s); keeping %d split(s), retrying", detail, len(self._splits)
                )
            if self.snapshots > before:
                backoff = self._initial_backoff_s
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self._max_backoff_s)

    def _apply(self, event: registry_pb2.WatchTrafficWeightsResponse) -> None:
        splits = {} if event.snapshot else dict(self._splits)
        for split in event.splits:
            if split.weights:
                splits[split.model] = dict(split.weights)
            else:
                splits.pop(split.model, None)
        self._splits = splits
        if event.snapshot:
            self.snapshots += 1
            self.synced.set()
        if self._on_change is not None:
            self._on_change(self.splits())
