"""Engine processes run below the data plane: every thread of every descendant gets the nice value,
the calling process keeps its own.

The function acts on the caller's descendants, so it runs in a child process of its own here (in
the test process it would also reach the test session's shared stack)."""

from __future__ import annotations

import json
import subprocess
import sys

# The "worker": starts an "engine" (a child with an extra thread and a grandchild), lowers its
# descendants' priority, then reports every thread's nice value and what the function returned.
_WORKER = """
import json, os, subprocess, sys, time
import psutil
from llmesh.worker.engine_priority import lower_descendants_priority

ENGINE = '''
import subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("ready", flush=True)
time.sleep(60)
'''
engine = subprocess.Popen([sys.executable, "-c", ENGINE], stdout=subprocess.PIPE, text=True)
assert engine.stdout.readline().strip() == "ready"
deadline = time.monotonic() + 10
while len(psutil.Process().children(recursive=True)) < 2:
    assert time.monotonic() < deadline, "the engine's child did not start"
    time.sleep(0.05)
own = os.getpriority(os.PRIO_PROCESS, 0)
tree = psutil.Process().children(recursive=True)
nice = lambda: sorted({os.getpriority(os.PRIO_PROCESS, t.id) for p in tree for t in p.threads()})
report = {"own": own, "tree": sorted(p.pid for p in tree), "threads": sum(len(p.threads()) for p in tree)}
report["returned"] = sorted(lower_descendants_priority(10))
report["after"] = nice()
report["own_after"] = os.getpriority(os.PRIO_PROCESS, 0)
lower_descendants_priority(5)  # never lowers
report["after_5"] = nice()
report["zero"] = lower_descendants_priority(0)
for p in tree:
    p.kill()
print(json.dumps(report))
"""


def test_every_thread_of_every_descendant_is_niced_and_the_caller_is_not() -> None:
    done = subprocess.run([sys.executable, "-c", _WORKER], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["returned"] == report["tree"] and len(report["tree"]) == 2
    assert report["threads"] >= 3
    expected = [max(10, report["own"])]
    assert report["after"] == expected and report["after_5"] == expected
    assert report["own_after"] == report["own"]
    assert report["zero"] == []
