"""Membership under faults: a database outage, a registry that errs, duplicate ids, kill -9 of a
worker, and what a worker reports about its engine."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from llmesh.common.errors import DependencyDown
from llmesh.common.server import start_server
from llmesh.common.v1 import common_pb2
from llmesh.registry.catalog import Catalog
from llmesh.registry.membership import MembershipRefused, WorkerMembership
from llmesh.registry.schema import workers_table
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tests.registry.procs import TcpProxy

S = registry_pb2
ADMIN = (("x-llmesh-role", "admin"),)
OUTAGE_S = 10.0


def worker(worker_id: str, port: int = 7001, models: tuple[str, ...] = ("tiny",)) -> registry_pb2.Worker:
    return S.Worker(worker_id=worker_id, address=f"127.0.0.1:{port}", models=list(models), capacity=4)


def load() -> common_pb2.WorkerLoad:
    return common_pb2.WorkerLoad(running_requests=1)


async def eventually(predicate: Any, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def listed(stub: Any) -> dict[str, int]:
    return {w.worker_id: w.status for w in (await stub.ListWorkers(S.ListWorkersRequest())).workers}


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
async def test_a_database_outage_costs_no_worker_its_membership(
    kind: str, request: pytest.FixtureRequest, make_registry: Any
) -> None:
    url = make_url(request.getfixturevalue(f"{kind}_database"))
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or (5432 if kind == "postgresql" else 3306))
    await proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    from tests.registry.conftest import drop_registry_tables

    direct = url.render_as_string(hide_password=False)
    drop_registry_tables(direct)  # (the proxy runs on this loop: blocking calls go around it)
    running, stub = await make_registry(database_url=proxied, ttl=1.5, interval=0.3)
    address = f"127.0.0.1:{running.port}"
    members = [WorkerMembership(address, worker(f"w{i}", 7000 + i), load, 0.3) for i in (1, 2)]
    for m in members:
        await m.start()
    try:
        await proxy.cut()
        began = time.monotonic()
        # Catalog reads and writes say UNAVAILABLE (retry), never INTERNAL.
        for call in (
            stub.GetModel(S.GetModelRequest(name="tiny")),
            stub.CreateModel(S.CreateModelRequest(model=S.Model(name="new-model")), metadata=ADMIN),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert "cannot reach the catalog database" in err.value.details()
        # A worker can still join (names resolve from the last catalog read) and be drained.
        late = WorkerMembership(address, worker("w3", 7003), load, 0.3)
        await asyncio.wait_for(late.start(), 5)
        members.append(late)
        await stub.DrainWorker(S.DrainWorkerRequest(worker_id="w2"))
        while time.monotonic() - began < OUTAGE_S:
            assert set(await listed(stub)) == {"w1", "w2", "w3"}
            await asyncio.sleep(0.2)
        await proxy.restore()

        # Heartbeats never failed (they do not touch the database) and nobody re-registered.
        assert [(m.failed_heartbeats, m.registrations) for m in members] == [(0, 1)] * 3
        assert await listed(stub) == {
            "w1": S.WORKER_STATUS_READY,
            "w2": S.WORKER_STATUS_DRAINING,
            "w3": S.WORKER_STATUS_READY,
        }
        assert (await stub.GetModel(S.GetModelRequest(name="tiny"))).model.name == "tiny-llama"

        # The membership changes made during the outage reach the database once it is back.
        engine = sa.create_engine(direct)

        def rows() -> list[tuple[str, str]]:
            with engine.connect() as conn:
                found = conn.execute(sa.select(workers_table.c.worker_id, workers_table.c.admin_status)).all()
            return sorted((r[0], r[1]) for r in found)

        async def persisted() -> bool:
            return await asyncio.to_thread(rows) == [
                ("w1", "WORKER_STATUS_READY"),
                ("w2", "WORKER_STATUS_DRAINING"),
                ("w3", "WORKER_STATUS_READY"),
            ]

        await eventually(persisted, 10)
        engine.dispose()
    finally:
        for m in members:
            await m.stop()
        await proxy.close()


def test_a_database_that_was_never_reached_is_unavailable_not_internal() -> None:
    catalog = Catalog.from_url("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(
        DependencyDown, match=r"cannot reach the catalog database postgresql\+psycopg://postgres@127.0.0.1:1"
    ):
        catalog.resolve_names(["tiny"])
    catalog.dispose()


class FlakyRegistry(registry_grpc.RegistryServiceServicer):
    """A registry whose first answers fail the way a broken one does (INTERNAL, UNKNOWN, UNAVAILABLE)."""

    def __init__(self) -> None:
        self.failures = [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE]
        self.heartbeat_failures = [grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED]
        self.registered = 0
        self.heartbeats: list[int] = []

    async def RegisterWorker(self, request: Any, context: Any) -> Any:
        if self.failures:
            await context.abort(self.failures.pop(0), "injected")
        self.registered += 1
        return S.RegisterWorkerResponse(lease_ttl_seconds=2, heartbeat_interval_seconds=1)

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        if self.heartbeat_failures:
            await context.abort(self.heartbeat_failures.pop(0), "injected")
        self.heartbeats.append(request.status)
        return S.HeartbeatResponse(known=True, status=S.WORKER_STATUS_READY)

    async def DeregisterWorker(self, request: Any, context: Any) -> Any:
        return S.DeregisterWorkerResponse()


async def test_the_worker_loop_retries_every_transient_error() -> None:
    flaky = FlakyRegistry()

    def add(server: grpc.aio.Server) -> list[str]:
        registry_grpc.add_RegistryServiceServicer_to_server(flaky, server)
        return ["llmesh.registry.v1.RegistryService"]

    running = await start_server("flaky", "127.0.0.1:0", add)
    membership = WorkerMembership(f"127.0.0.1:{running.port}", worker("w1"), load, 0.1, max_backoff_s=0.2)
    try:
        await asyncio.wait_for(membership.start(), 5)  # INTERNAL, UNKNOWN, UNAVAILABLE: all retried
        assert flaky.registered == 1

        async def heartbeating() -> bool:
            return len(flaky.heartbeats) >= 3

        await eventually(heartbeating)
        assert membership.failed_heartbeats == 2 and not membership.refused.is_set()
        # The worker reports its engine's failure at once, not at the next period.
        membership.report_status(S.WORKER_STATUS_FAILED)

        async def reported() -> bool:
            return S.WORKER_STATUS_FAILED in flaky.heartbeats

        await eventually(reported, 0.5)
    finally:
        await membership.stop()
        await running.stop(None)


async def test_a_duplicate_id_elsewhere_is_refused_and_stops_the_loop(
    make_registry: Any, tmp_path: Path
) -> None:
    running, stub = await make_registry(ttl=1.5, interval=0.3)
    address = f"127.0.0.1:{running.port}"
    first = WorkerMembership(address, worker("w1", 7001), load, 0.3)
    await first.start()
    impostor = WorkerMembership(address, worker("w1", 7999), load, 0.3)
    with pytest.raises(MembershipRefused, match=r"ALREADY_EXISTS.*in use by a live worker at 127.0.0.1:7001"):
        await impostor.start()
    assert (await stub.ListWorkers(S.ListWorkersRequest())).workers[0].address == "127.0.0.1:7001"

    # A refusal during the heartbeat loop (here: the registry forgot w1, and its model is gone
    # from the catalog) stops the loop and tells the worker.
    refusals: list[MembershipRefused] = []
    second = WorkerMembership(address, worker("w2", 7002, ("qwen2",)), load, 0.1, on_refused=refusals.append)
    await second.start()
    await stub.UpdateModel(
        S.UpdateModelRequest(model=S.Model(name="qwen2-0.5b-instruct", status=S.MODEL_STATUS_RETIRED)),
        metadata=ADMIN,
    )
    await stub.DeregisterWorker(S.DeregisterWorkerRequest(worker_id="w2"))
    await asyncio.wait_for(second.refused.wait(), 3)
    assert refusals and "INVALID_ARGUMENT" in refusals[0].message and "qwen2" in refusals[0].message
    await first.stop()
    await second.stop()
    await impostor.stop()


WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from llmesh.common.v1 import common_pb2
    from llmesh.registry.membership import WorkerMembership
    from llmesh.registry.v1 import registry_service_pb2 as pb

    async def main():
        m = WorkerMembership(sys.argv[1], pb.Worker(worker_id="victim", address="127.0.0.1:7100", models=["tiny"]),
                             common_pb2.WorkerLoad, 0.2)
        await m.start()
        print("registered", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_kill_9_of_a_worker_removes_it_within_its_ttl(make_registry: Any) -> None:
    running, stub = await make_registry(ttl=1.0, interval=0.2)
    watch = stub.WatchWorkers(S.WatchWorkersRequest())
    assert (await watch.read()).type == S.WORKER_EVENT_TYPE_SNAPSHOT_END
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER_SCRIPT, f"127.0.0.1:{running.port}", stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"registered"
        assert (await asyncio.wait_for(watch.read(), 2)).type == S.WORKER_EVENT_TYPE_ADDED
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while (event := await asyncio.wait_for(watch.read(), 3)).type != S.WORKER_EVENT_TYPE_REMOVED:
            pass
        gone_after = time.monotonic() - killed
        assert event.worker.worker_id == "victim" and event.worker.status == S.WORKER_STATUS_GONE
        # TTL 1 s, plus at most one sweep (TTL/4) and the last heartbeat's age.
        assert gone_after < 1.0 + 0.25 + 0.2 + 0.3, gone_after
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        watch.cancel()


async def test_worker_reported_status_combines_with_the_operators(make_registry: Any) -> None:
    running, stub = await make_registry(ttl=2, interval=0.2)
    membership = WorkerMembership(f"127.0.0.1:{running.port}", worker("w1"), load, 0.2)
    await membership.start()

    async def status_is(expected: int) -> None:
        async def check() -> bool:
            return (await listed(stub)).get("w1") == expected

        await eventually(check, 1.0)

    membership.report_status(S.WORKER_STATUS_FAILED)
    await status_is(S.WORKER_STATUS_FAILED)
    assert (await stub.GetModel(S.GetModelRequest(name="tiny"))).model.ready_workers == 0
    await stub.CordonWorker(S.CordonWorkerRequest(worker_id="w1", cordoned=True))
    membership.report_status(S.WORKER_STATUS_READY)
    await status_is(S.WORKER_STATUS_CORDONED)  # the engine is back; the operator's cordon holds
    await stub.CordonWorker(S.CordonWorkerRequest(worker_id="w1", cordoned=False))
    await status_is(S.WORKER_STATUS_READY)
    membership.report_status(S.WORKER_STATUS_DRAINING)
    await status_is(S.WORKER_STATUS_DRAINING)

    async def told() -> bool:  # the heartbeat answer carries the status the registry holds
        return membership.status == S.WORKER_STATUS_DRAINING

    await eventually(told, 1.0)
    await membership.stop()
