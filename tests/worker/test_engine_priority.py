"""Engine processes run below the data plane: every thread of every descendant gets the nice value."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from llmesh.worker.engine_priority import lower_descendants_priority

# A child that starts a thread and a grandchild, then waits: the shape of vLLM's engine processes.
_TREE = """
import subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("ready", flush=True)
time.sleep(60)
"""


def test_every_thread_of_every_descendant_is_niced_and_this_process_is_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while len(psutil.Process().children(recursive=True)) < 2:
            assert time.monotonic() < deadline, "the grandchild did not start"
            time.sleep(0.05)
        own = os.getpriority(os.PRIO_PROCESS, 0)
        changed = lower_descendants_priority(10)
        tree = [*psutil.Process(child.pid).children(recursive=True), psutil.Process(child.pid)]
        assert sorted(changed) == sorted(p.pid for p in tree)
        threads = [t.id for p in tree for t in p.threads()]
        assert len(threads) >= 3
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {max(10, own)}
        assert os.getpriority(os.PRIO_PROCESS, 0) == own
        # Never lowers a nice value (that needs privileges); 0 leaves everything alone.
        lower_descendants_priority(5)
        assert lower_descendants_priority(0) == []
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {max(10, own)}
    finally:
        for p in psutil.Process(child.pid).children(recursive=True):
            p.kill()
        child.kill()
        child.wait()
