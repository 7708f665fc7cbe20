"""Traffic splits between model versions, as schedulers follow them (a snapshot, then changes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

Splits = Mapping[str, Mapping[str, int]]


def split_proto(model: str, weights: Mapping[str, int]) -> registry_pb2.TrafficSplit:
    """One model's split on the wire (empty weights: no split)."""
    return registry_pb2.TrafficSplit(model=model, weights=dict(sorted(weights.items())))


class TrafficFeed:
    """The splits in force (model -> {version: weight}) and the streams watching them."""

    def __init__(self, splits: Splits | None = None) -> None:
        self._splits: dict[str, dict[str, int]] = {m: dict(w) for m, w in (splits or {}).items()}
        self._watchers: set[asyncio.Queue[registry_pb2.WatchTrafficWeightsResponse | None]] = set()

    def splits(self) -> dict[str, dict[str, int]]:
        """A copy of every split in force."""
        return {m: dict(w) for m, w in self._splits.items()}

    def update(self, splits: Splits) -> list[str]:
        """Replace the splits with what the catalog now holds; tell watchers which ones changed."""
        new = {m: dict(w) for m, w in splits.items() if w}
        changed = sorted(m for m in set(new) | set(self._splits) if new.get(m) != self._splits.get(m))
        self._splits = new
        if changed:
            event = registry_pb2.WatchTrafficWeightsResponse(
                snapshot=False, splits=[split_proto(m, new.get(m, {})) for m in changed]
            )
            for queue in list(self._watchers):
                queue.put_nowait(event)
        return changed

    async def watch(self) -> AsyncIterator[registry_pb2.WatchTrafficWeightsResponse]:
        """Every split first, then the changed ones, until `close()`."""
        queue: asyncio.Queue[registry_pb2.WatchTrafficWeightsResponse | None] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            yield registry_pb2.WatchTrafficWeightsResponse(
                snapshot=True, splits=[split_proto(m, w) for m, w in sorted(self._splits.items())]
            )
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._watchers.discard(queue)

    def close(self) -> None:
        """End every watch stream (registry shutting down)."""
        for queue in list(self._watchers):
            queue.put_nowait(None)
