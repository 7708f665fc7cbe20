"""A worker whose engine died leaves the pool and exits non-zero, so its supervisor restarts it.

Without this a dead vLLM engine core leaves a worker process that still heartbeats, still gets
picked, and fails every request it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from llmesh.worker.engine import Supervised

# How often the worker asks; vLLM notices its engine core's exit at once (a monitor thread).
CHECK_INTERVAL_S = 1.0


async def watch_engine(
    engine: Supervised, on_failure: Callable[[str], Awaitable[None]], interval_s: float = CHECK_INTERVAL_S
) -> None:
    """Call `on_failure(reason)` once the engine reports a failure, then return."""
    while True:
        await asyncio.sleep(interval_s)
        reason = engine.failure()
        if reason:
            await on_failure(reason)
            return
