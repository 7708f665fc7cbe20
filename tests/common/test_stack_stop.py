"""Stopping the stack's children: SIGTERM, then SIGKILL, and never a hang on a child that will not go.

The children here are plain Python processes (the stack's real services are started elsewhere):
these tests are about the signals and the waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmesh.cli.stack import Child, Stack

IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"


def _stubborn_child(tmp_path: Path) -> Child:
    """A child in a process group of its own, as the stack starts them, that ignores SIGTERM."""
    argv = [sys.executable, "-c", IGNORES_SIGTERM]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, process_group=0)
    assert process.stdout is not None and process.stdout.readline().strip() == b"up"
    return Child("stubborn", "worker", process, tmp_path / "ready.json", tmp_path / "log")  # type: ignore[arg-type]


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    child = _stubborn_child(tmp_path)
    Stack._terminate(child, timeout_s=0.5)
    assert child.process.returncode == -signal.SIGKILL


def test_a_child_sigkill_does_not_end_is_reported_and_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A process stuck in the kernel outlives SIGKILL; stand in for one by letting no SIGKILL through.
    child = _stubborn_child(tmp_path)
    monkeypatch.setattr(os, "killpg", lambda pid, sig: None)
    monkeypatch.setattr(child.process, "kill", lambda: None)
    try:
        Stack._kill(child, wait_s=0.5)
        assert child.process.poll() is None
        err = capsys.readouterr().err
        assert f"stubborn (pid {child.process.pid}) has not exited 0.5 s after SIGKILL; left behind" in err, (
            err
        )
    finally:
        monkeypatch.undo()
        child.process.kill()
        child.process.wait(10)
