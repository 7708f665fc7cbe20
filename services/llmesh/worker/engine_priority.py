"""CPU priority of an engine's own processes, below the data plane's.

vLLM's engine core busy-polls (`sched_yield`) while its model worker computes, so on a CPU-only
host one core stays runnable for as long as requests run. At the same priority, Envoy, this
worker's relay and the control plane queue behind it: measured on 2 cores, Envoy's worker thread
waited 0.7-1.2 s to run during a ~1 s stream, and tokens reached clients in bursts. With the
engine's processes niced, the data plane runs the moment it has work; with idle cores, nothing
changes. Nice is per thread on Linux: every thread of every descendant process is set, and threads
they start later inherit it. Where the engine binds its computation to some of the CPUs (vLLM's
CPU backend), the data plane also keeps off those (llmesh.common.cpu_placement).
"""

from __future__ import annotations

import logging
import os

import psutil

log = logging.getLogger(__name__)

# Low enough that Envoy, the relay and the control plane always run first; the engine still gets
# every cycle they leave.
DEFAULT_ENGINE_NICE = 10


def lower_descendants_priority(nice: int, root_pid: int | None = None) -> list[int]:
    """Raise the nice value of every thread of the descendants of `root_pid` (default: this
    process) to at least `nice`.

    Returns the pids of the descendants it set. Never lowers a nice value (that needs privileges)."""
    changed: list[int] = []
    if nice <= 0:
        return changed
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            for thread in process.threads():
                if os.getpriority(os.PRIO_PROCESS, thread.id) < nice:
                    os.setpriority(os.PRIO_PROCESS, thread.id, nice)
            changed.append(process.pid)
        except (psutil.Error, ProcessLookupError, PermissionError) as e:
            log.warning("could not lower the CPU priority of engine process %s: %s", process.pid, e)
    return changed
