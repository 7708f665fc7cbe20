"""The scheduler follows the registry through its absence and restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.config import ModelConfig
from llmesh.common.v1 import common_pb2
from llmesh.registry.membership import WorkerMembership
from llmesh.registry.server import RegistryServiceConfig, start_registry
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc
from llmesh.scheduler.pool import WorkerPool
from llmesh.scheduler.records import Demand
from llmesh.scheduler.registry_watch import RegistryWatch
from llmesh.scheduler.server import SchedulerServiceConfig, start_scheduler
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2
from llmesh.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc
from tests.registry.conftest import drop_registry_tables, mysql_database, postgresql_database  # noqa: F401
from tests.registry.procs import RegistryProcess
from tests.support import free_port


@pytest.fixture(params=["sqlite", "postgresql"])
def db_kind(request: pytest.FixtureRequest) -> str:
    """The catalog backend of a registry process."""
    return str(request.param)


async def test_scheduler_waits_for_registry_and_survives_its_restart(tmp_path: Path) -> None:
    port = free_port()
    registry_config = RegistryServiceConfig(
        listen=f"127.0.0.1:{port}",
        database_url=f"sqlite:///{tmp_path}/llmesh.db",
        models=(ModelConfig(name="tiny-llama"),),
    )
    scheduler = await start_scheduler(
        SchedulerServiceConfig(listen="127.0.0.1:0", registry_address=f"127.0.0.1:{port}")
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
    stub = scheduler_grpc.SchedulerServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    request = scheduler_pb2.AcquireRequest(request_id="r1", model="tiny-llama", max_tokens=10)
    registries = []
    try:
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Acquire(request)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "has not received the worker list" in err.value.details()

        registries.append(await start_registry(registry_config))
        reg_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        registry = registry_grpc.RegistryServiceStub(reg_channel)
        await registry.RegisterWorker(
            registry_pb2.RegisterWorkerRequest(
                worker=registry_pb2.Worker(worker_id="w1", address="w1.local:7000", models=["tiny-llama"])
            )
        )

        async def acquired() -> scheduler_pb2.Lease:
            while True:
                try:
                    return (await stub.Acquire(request)).lease
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.02)

        lease = await asyncio.wait_for(acquired(), 2.0)
        assert lease.worker_id == "w1"
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == (
            health_pb2.HealthCheckResponse.SERVING
        )

        # Registry gone: the scheduler keeps routing to the workers it knew.
        await registries.pop().stop(None)
        await stub.Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id))
        assert (await stub.Acquire(scheduler_pb2.AcquireRequest(request_id="r2", model="tiny-llama"))).lease

        # The restarted registry serves its persisted membership: w1 never leaves the pool and
        # the lease r2 still holds on it is still counted.
        registries.append(await start_registry(registry_config))
        # Once the watch is back (w2, registered now, shows up), w1 is still there, lease counted.
        await registry.RegisterWorker(
            registry_pb2.RegisterWorkerRequest(
                worker=registry_pb2.Worker(worker_id="w2", address="w2.local:7000", models=["tiny-llama"])
            )
        )

        async def pool_has_w2() -> scheduler_pb2.GetSchedulerStatusResponse:
            while True:
                status = await stub.GetSchedulerStatus(scheduler_pb2.GetSchedulerStatusRequest())
                if any(w.worker_id == "w2" for w in status.workers):
                    return status
                await asyncio.sleep(0.02)

        status = await asyncio.wait_for(pool_has_w2(), 3.0)
        assert [(w.worker_id, w.active_leases, w.cordoned) for w in status.workers] == [
            ("w1", 1, False),
            ("w2", 0, False),
        ]
        await reg_channel.close(None)
    finally:
        await channel.close(None)
        await scheduler.stop(None)
        for running in registries:
            await running.stop(None)


async def test_kill_9_of_the_registry_loses_no_row_no_worker_and_no_lease_count(
    db_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/llmesh.db"
    if db_kind == "postgresql":
        url = request.getfixturevalue("postgresql_database")
        drop_registry_tables(url)
    registry = RegistryProcess(tmp_path / "registry", url, ttl=3, interval=1)
    await asyncio.to_thread(registry.start)
    channel = grpc.aio.insecure_channel(registry.address)
    reg = registry_grpc.RegistryServiceStub(channel)
    admin = (("x-llmesh-role", "admin"), ("x-llmesh-user", "ops"))
    members = [
        WorkerMembership(
            registry.address,
            registry_pb2.Worker(worker_id=f"w{i}", address=f"w{i}.local:7000", models=["tiny"], capacity=8),
            common_pb2.WorkerLoad,
            1.0,
        )
        for i in (1, 2)
    ]
    scheduler = None
    try:
        for version in ("v2", "v3"):
            await reg.CreateModel(
                registry_pb2.CreateModelRequest(model=registry_pb2.Model(name="tiny-llama", version=version)),
                metadata=admin,
            )
        await reg.SetTrafficWeights(
            registry_pb2.SetTrafficWeightsRequest(name="tiny", weights={"v1": 80, "v3": 20}), metadata=admin
        )
        before = (await reg.ExportModels(registry_pb2.ExportModelsRequest(), metadata=admin)).yaml
        for m in members:
            await m.start()
        scheduler = await start_scheduler(
            SchedulerServiceConfig(listen="127.0.0.1:0", registry_address=registry.address)
        )
        sched_channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
        sched = scheduler_grpc.SchedulerServiceStub(sched_channel)

        async def status() -> scheduler_pb2.GetSchedulerStatusResponse:
            return await sched.GetSchedulerStatus(scheduler_pb2.GetSchedulerStatusRequest())

        async def both_workers() -> None:
            while len((await status()).workers) < 2:  # noqa: ASYNC110 (polling a remote server)
                await asyncio.sleep(0.05)

        await asyncio.wait_for(both_workers(), 5)
        held = [
            (
                await sched.Acquire(
                    scheduler_pb2.AcquireRequest(request_id=f"stream-{i}", model="tiny-llama")
                )
            ).lease
            for i in range(3)
        ]
        counts = {w.worker_id: w.active_leases for w in (await status()).workers}
        assert sum(counts.values()) == 3

        # Watch the scheduler throughout: every worker stays, its count stays, every request gets a lease.
        seen: list[tuple[int, dict[str, int]]] = []
        failures: list[str] = []
        done = asyncio.Event()

        async def observe() -> None:
            i = 0
            while not done.is_set():
                now = await status()
                seen.append((len(now.workers), {w.worker_id: w.active_leases for w in now.workers}))
                i += 1
                try:
                    lease = (
                        await sched.Acquire(
                            scheduler_pb2.AcquireRequest(request_id=f"probe-{i}", model="tiny-llama")
                        )
                    ).lease
                    await sched.Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id))
                except grpc.aio.AioRpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")
                await asyncio.sleep(0.05)

        observer = asyncio.create_task(observe())
        registry.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(registry.start)
        # The restarted registry knows both workers at once (no re-registration needed).
        listed = (await reg.ListWorkers(registry_pb2.ListWorkersRequest())).workers
        assert sorted(w.worker_id for w in listed) == ["w1", "w2"]
        await asyncio.sleep(3.5)  # past one TTL: heartbeats kept both alive
        done.set()
        await observer
        assert failures == []
        assert all(n == 2 and c == counts for n, c in seen), [s for s in seen if s != (2, counts)][:3]
        # The watch is back: a worker joining now reaches the scheduler, next to the two it kept.
        await reg.RegisterWorker(
            registry_pb2.RegisterWorkerRequest(
                worker=registry_pb2.Worker(worker_id="w3", address="w3.local:7000", models=["tiny-llama"])
            )
        )

        async def three_workers() -> dict[str, int]:
            while len(now := (await status()).workers) < 3:  # noqa: ASYNC110 (polling a remote server)
                await asyncio.sleep(0.05)
            return {w.worker_id: w.active_leases for w in now}

        assert await asyncio.wait_for(three_workers(), 8) == {**counts, "w3": 0}
        assert [m.registrations for m in members] == [1, 1]
        assert (await reg.ExportModels(registry_pb2.ExportModelsRequest(), metadata=admin)).yaml == before
        splits = (await reg.ListTrafficWeights(registry_pb2.ListTrafficWeightsRequest())).splits
        assert [(s.model, dict(s.weights)) for s in splits] == [("tiny-llama", {"v1": 80, "v3": 20})]
        for lease in held:
            await sched.Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id))
        await sched_channel.close(None)
    finally:
        for m in members:
            await m.stop()
        if scheduler is not None:
            await scheduler.stop(None)
        await channel.close(None)
        registry.stop()


async def test_a_snapshot_without_a_leased_worker_keeps_it_until_its_leases_end(tmp_path: Path) -> None:
    port = free_port()

    def config(db: str) -> RegistryServiceConfig:
        return RegistryServiceConfig(
            listen=f"127.0.0.1:{port}",
            database_url=f"sqlite:///{tmp_path}/{db}.db",
            models=(ModelConfig(name="tiny-llama"),),
        )

    registry = await start_registry(config("first"))
    pool = WorkerPool()
    watch = RegistryWatch(f"127.0.0.1:{port}", pool, initial_backoff_s=0.05, max_backoff_s=0.2)
    reg_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    reg = registry_grpc.RegistryServiceStub(reg_channel)
    watch.start()
    try:
        for wid in ("w1", "w2"):
            await reg.RegisterWorker(
                registry_pb2.RegisterWorkerRequest(
                    worker=registry_pb2.Worker(worker_id=wid, address=f"{wid}.local:1", models=["tiny-llama"])
                )
            )
        await until(lambda: len(pool.workers()) == 2)
        lease = await pool.acquire(Demand(request_id="r1", model="tiny-llama"), 1.0)
        # A registry that lost its membership (another database) sends a snapshot without anyone.
        await registry.stop(None)
        registry = await start_registry(config("second"))
        await until(lambda: watch.snapshots >= 2)
        kept = {w.worker_id: (w.active, w.cordoned) for w in pool.workers()}
        assert kept == {lease.worker_id: (1, True)}  # the idle worker left; the busy one stays, cordoned
        # It comes back: routable again, its lease still counted.
        await reg.RegisterWorker(
            registry_pb2.RegisterWorkerRequest(
                worker=registry_pb2.Worker(
                    worker_id=lease.worker_id, address=lease.worker_address, models=["tiny-llama"]
                )
            )
        )
        await until(
            lambda: (
                [(w.worker_id, w.active, w.cordoned) for w in pool.workers()] == [(lease.worker_id, 1, False)]
            )
        )
        # It leaves again; once its lease ends it is swept out.
        await reg.DeregisterWorker(registry_pb2.DeregisterWorkerRequest(worker_id=lease.worker_id))
        await until(lambda: [(w.active, w.cordoned) for w in pool.workers()] == [(1, True)])
        assert pool.release(lease.lease_id)
        await until(lambda: pool.workers() == [], timeout=3.0)
    finally:
        await watch.stop()
        await reg_channel.close(None)
        await registry.stop(None)


async def test_the_watch_survives_any_exception(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = await start_registry(
        RegistryServiceConfig(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path}/x.db",
            models=(ModelConfig(name="tiny-llama"),),
        )
    )
    pool = WorkerPool()
    real_upsert = pool.upsert_worker
    calls = 0

    def flaky_upsert(spec: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected bug")
        real_upsert(spec)

    pool.upsert_worker = flaky_upsert  # type: ignore[method-assign]
    watch = RegistryWatch(f"127.0.0.1:{registry.port}", pool, initial_backoff_s=0.05, max_backoff_s=0.2)
    reg_channel = grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}")
    reg = registry_grpc.RegistryServiceStub(reg_channel)
    watch.start()
    try:
        await until(lambda: watch.snapshots >= 1)
        await reg.RegisterWorker(
            registry_pb2.RegisterWorkerRequest(
                worker=registry_pb2.Worker(worker_id="w1", address="w1.local:1", models=["tiny-llama"])
            )
        )
        await until(lambda: [w.worker_id for w in pool.workers()] == ["w1"])
        assert calls >= 2 and watch.snapshots >= 2
        assert "watch on registry" in caplog.text and "injected bug" in caplog.text
    finally:
        await watch.stop()
        await reg_channel.close(None)
        await registry.stop(None)


async def until(predicate: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
