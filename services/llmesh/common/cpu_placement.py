"""Keep the data plane off the CPUs an engine computes on.

vLLM's CPU backend binds its model-computing process (OpenMP threads) to all CPUs but a reserved
few — one on a 2-core host — and leaves its engine core, its frontend and everything else to share
those. llmesh's engines run niced (worker.engine_priority), so any data-plane thread the kernel
places on a computing CPU stops the model for as long as it runs. Confined to the CPUs the engines
left free, Envoy, the worker's relay and the control plane compete only with each other and with
the engine core's busy-polling (niced, so it yields to them), and the model computes undisturbed.

The computing CPUs are read from the engine's own processes, not predicted: a descendant whose
CPU affinity is narrower than its ancestor's was bound by the engine. Engines that bind nothing
(GPU, llama.cpp, remote APIs) leave the placement as it was.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import psutil

log = logging.getLogger(__name__)


def allowed_cpus(pid: int = 0) -> frozenset[int]:
    """The CPUs `pid` (default: this process) may run on."""
    return frozenset(os.sched_getaffinity(pid))


def _descendant_cpus() -> dict[int, frozenset[int]]:
    """The CPUs each descendant of this process may run on, by pid (those gone meanwhile left out)."""
    cpus: dict[int, frozenset[int]] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            cpus[process.pid] = allowed_cpus(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return cpus


def _bound(descendants: dict[int, frozenset[int]]) -> frozenset[int]:
    """The union of the descendants' affinities narrower than this process's own."""
    own = allowed_cpus()
    return frozenset(cpu for cpus in descendants.values() if cpus < own for cpu in cpus)


def confine(pid: int, cpus: Iterable[int]) -> bool:
    """Restrict every thread of `pid` to `cpus` (threads started later inherit it from theirs).
    False when the process is gone or may not be changed."""
    allowed = set(cpus)
    try:
        for thread in psutil.Process(pid).threads():
            try:
                os.sched_setaffinity(thread.id, allowed)
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
    except (psutil.Error, ProcessLookupError, PermissionError, OSError) as e:
        log.warning("could not confine process %s to CPUs %s: %s", pid, sorted(allowed), e)
        return False
    return True


def keep_off(compute: frozenset[int], pids: Iterable[int]) -> frozenset[int]:
    """Confine `pids` to the CPUs this process may use minus `compute`, when that leaves any.
    Returns the CPUs they were confined to (empty: nothing changed)."""
    free = allowed_cpus() - compute
    if not compute or not free:
        return frozenset()
    for pid in pids:
        confine(pid, free)
    return free


def keep_own_processes_off_engine_cpus() -> frozenset[int]:
    """In a worker whose engine just started: this process and the engine's processes that were not
    bound (vLLM's engine core) move to the CPUs the engine's computation left free.

    Returns the CPUs the engine computes on (empty: it bound none), for the supervisor to keep the
    rest of the stack off them too."""
    descendants = _descendant_cpus()
    compute = _bound(descendants)
    if not compute:
        return compute
    unbound = [os.getpid(), *(pid for pid, cpus in descendants.items() if not cpus <= compute)]
    free = keep_off(compute, unbound)
    if free:
        log.info(
            "the engine computes on CPUs %s; this worker and its engine core run on %s",
            sorted(compute),
            sorted(free),
        )
    return compute


__all__ = [
    "allowed_cpus",
    "confine",
    "keep_off",
    "keep_own_processes_off_engine_cpus",
]
