"""Operations on the shared vLLM stack for tests that stop, kill or restart its workers."""

from __future__ import annotations

import time

from tests.support import VllmStack, edge_worker_hosts


def wait_for_edge_workers(stack: VllmStack, addresses: set[str], timeout_s: float = 30.0) -> None:
    """Until Envoy's workers cluster holds exactly `addresses`, all healthy (EDS from the picker)."""
    deadline = time.monotonic() + timeout_s
    hosts: dict[str, str] = {}
    while time.monotonic() < deadline:
        hosts = edge_worker_hosts(stack.edge_admin_port)
        if set(hosts) == addresses and all(flags == "healthy" for flags in hosts.values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"Envoy's workers are {hosts}, expected {sorted(addresses)} healthy")


def wait_until_only_healthy(stack: VllmStack, address: str, timeout_s: float = 30.0) -> None:
    """Until `address` is the only worker Envoy routes new requests to (others may still be listed,
    draining, while their streams finish)."""
    deadline = time.monotonic() + timeout_s
    hosts: dict[str, str] = {}
    while time.monotonic() < deadline:
        hosts = edge_worker_hosts(stack.edge_admin_port)
        healthy = {host for host, flags in hosts.items() if flags == "healthy"}
        if healthy == {address}:
            return
        time.sleep(0.05)
    raise AssertionError(f"Envoy's workers are {hosts}, expected only {address} healthy")


def restart_worker(stack: VllmStack, worker_id: str) -> None:
    """Start a stopped or killed worker again on its old address and wait until Envoy routes to it."""
    address = stack.workers[worker_id]
    child = stack.stack.start("worker", name=worker_id, listen=address, extra=("--worker-id", worker_id))
    stack.workers[worker_id] = f"127.0.0.1:{child.port}"
    wait_for_edge_workers(stack, set(stack.workers.values()))
