"""The worker's report of a cancelled stream's usage, after the reporter closed (streams cut at the
end of the shutdown grace): dropped with a warning, not sent on a closed channel from a stray task
("Task exception was never retrieved ... Channel is closed")."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from llmesh.worker.lease_reporter import LeaseReporter


async def test_a_report_after_close_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    reporter = LeaseReporter(address)
    await reporter.close()
    with caplog.at_level(logging.WARNING, logger="llmesh.worker.lease_reporter"):
        reporter.cancelled("lease-2", 3, 4)
        await asyncio.sleep(0.1)
    assert "lease-2 not reported: the worker is stopping" in caplog.text
    assert "Channel is closed" not in caplog.text
