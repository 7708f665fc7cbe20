"""What a worker is doing: requests in flight, and whether it still takes new ones (draining)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from llmesh.common.errors import DependencyDown


class Activity:
    """Counts in-flight requests across the worker's servicers; refuses new ones while draining."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Hold one in-flight slot; DependencyDown (UNAVAILABLE, retried by Envoy) while draining."""
        if self.draining:
            raise DependencyDown(f"worker {self.worker_id} is draining; retry on another worker")
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float | None) -> int:
        """Wait until nothing is in flight (or the timeout); returns what is still running."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self.active
