"""The data plane keeps off the CPUs an engine binds its computation to.

The functions act on the caller and its descendants, so a "worker" runs in a child process of its
own here (in the test process they would also reach the test session's shared stack). Its
"engine" mimics vLLM's CPU backend: a computing process bound to the first CPU, and an engine core
with an extra thread that binds nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmesh.common.cpu_placement import allowed_cpus, confine, keep_off

_WORKER = """
import json, os, subprocess, sys, threading, time
import psutil
from llmesh.common.cpu_placement import allowed_cpus, keep_own_processes_off_engine_cpus

COMPUTE = min(os.sched_getaffinity(0))
BOUND = f'''
import os, time
os.sched_setaffinity(0, {{{COMPUTE}}})
print("ready", flush=True)
time.sleep(60)
'''
CORE = '''
import threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("ready", flush=True)
time.sleep(60)
'''
report = {"before": sorted(keep_own_processes_off_engine_cpus())}  # no engine yet: a no-op
tree = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for code in (BOUND, CORE)]
for process in tree:
    assert process.stdout.readline().strip() == "ready"
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # a thread of the worker itself
bound, core = (psutil.Process(p.pid) for p in tree)
report["compute"] = sorted(keep_own_processes_off_engine_cpus())
affinities = lambda p: sorted({tuple(sorted(os.sched_getaffinity(t.id))) for t in p.threads()})
report["worker"] = affinities(psutil.Process())
report["core"] = affinities(core)
report["bound"] = affinities(bound)
for p in tree:
    p.kill()
print(json.dumps(report))
"""


def _cpus() -> list[int]:
    cpus = sorted(allowed_cpus())
    if len(cpus) < 2:
        pytest.skip(f"needs at least 2 CPUs to keep one free of the engine; this process may use {cpus}")
    return cpus


def test_the_worker_and_its_engine_core_move_off_the_cpu_the_engine_computes_on() -> None:
    cpus = _cpus()
    done = subprocess.run([sys.executable, "-c", _WORKER], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    compute, free = [cpus[0]], cpus[1:]
    assert report["before"] == []  # no engine yet: nothing bound
    assert report["compute"] == compute
    # Every thread of the worker and of the unbound engine core, none of the computing process.
    assert report["worker"] == [free] and report["core"] == [free]
    assert report["bound"] == [compute]


def test_keep_off_confines_other_processes_to_the_cpus_left_free() -> None:
    cpus = _cpus()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert keep_off(frozenset({cpus[0]}), [other.pid]) == frozenset(cpus[1:])
        assert sorted(os.sched_getaffinity(other.pid)) == cpus[1:]
        # No engine bound anything, or it took every CPU: nothing changes.
        assert keep_off(frozenset(), [other.pid]) == frozenset()
        assert confine(other.pid, cpus)
        assert keep_off(frozenset(cpus), [other.pid]) == frozenset()
        assert sorted(os.sched_getaffinity(other.pid)) == cpus
    finally:
        other.kill()
        other.wait()
    # A process that is gone is reported, not raised.
    assert not confine(other.pid, cpus)
