"""Reservations settled through the real edge: max_parallel slots and ledger rows for streams that
end, are cancelled, are refused by the picker, or lose their worker to SIGKILL.

Real Envoy (ext_authz, then the picker), AuthService, the scheduler reporting usage to the ledger;
workers run the ScriptedEngine test double (these tests are about accounting, not inference), in
this process or, to be killed, as a process of their own (`llmesh.bench.scripted_worker`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2

from llmesh.auth.v1 import auth_service_pb2 as auth_pb
from llmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.scheduler.picker_request import read_request
from tests.auth.conftest import check_request, grpc_frame, header_map
from tests.auth.test_auth_through_envoy import bearer, make_key
from tests.scripted_stack import MODEL, ScriptedStack, chat, engine, wait_for_edge_workers

pytestmark = pytest.mark.envoy

STREAM = "/llmesh.model.v1.ModelService/StreamChatCompletion"


def ledger_rows(tmp_path: Path) -> list[sa.Row]:  # type: ignore[type-arg]
    """Every usage row of the stack's auth database (tests/scripted_stack.py puts it in tmp_path)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'auth.db'}")
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT * FROM auth_usage ORDER BY created_at")).all())
    finally:
        engine.dispose()


async def rows_once(tmp_path: Path, count: int, timeout_s: float = 15.0) -> list[sa.Row]:  # type: ignore[type-arg]
    """The ledger's rows once it holds `count` (usage lands just after a stream ends: poll)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await asyncio.to_thread(ledger_rows, tmp_path)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def open_stream(
    stack: ScriptedStack, key: str, request: pb.CreateChatCompletionRequest
) -> grpc.aio.UnaryStreamCall | grpc.StatusCode:
    """A stream that has produced its first token, or the status it was refused with."""
    call = stack.models.StreamChatCompletion(request, metadata=bearer(key))
    try:
        async for chunk in call:
            if chunk.choices:
                return call
    except grpc.aio.AioRpcError as error:
        return error.code()
    raise AssertionError("the stream ended before its first token")


async def admitted_within(
    stack: ScriptedStack, key: str, request: pb.CreateChatCompletionRequest, timeout_s: float = 10.0
) -> grpc.aio.UnaryStreamCall:
    """Retry (refusals cost nothing) until the edge admits a stream: a slot was given back."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = await open_stream(stack, key, request)
        if not isinstance(got, grpc.StatusCode):
            return got
        assert got == grpc.StatusCode.RESOURCE_EXHAUSTED, got
        assert time.monotonic() < deadline, "no slot was given back"
        await asyncio.sleep(0.05)


async def drain(call: grpc.aio.UnaryStreamCall) -> int:
    return sum([len(c.choices) async for c in call])


async def test_n_plus_k_concurrent_streams_on_max_parallel_n_admit_n_then_the_next_once_one_ends(
    stack_factory, tmp_path: Path
) -> None:
    stack = await stack_factory({"w0": engine(tokens_per_second=10)}, edge=True, auth=True)
    n, k = 2, 3
    key = await make_key(stack, "gina", limits=auth_pb.Limits(max_parallel=n))
    long = chat(max_tokens=64, ignore_eos=True)  # 6.4 s each at 10 tokens/s: they outlast the checks
    got = await asyncio.gather(*(open_stream(stack, key, long) for _ in range(n + k)))
    streams = [g for g in got if not isinstance(g, grpc.StatusCode)]
    assert len(streams) == n and got.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == k, got
    assert await open_stream(stack, key, long) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A cancelled stream gives its slot back (once the picker reports it to the ledger).
    streams[0].cancel()
    replacement = await admitted_within(stack, key, long)
    assert await open_stream(stack, key, long) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A stream that ends gives its slot back too.
    assert await drain(streams[1]) == 63  # its first token was read already
    last = await admitted_within(stack, key, chat(max_tokens=3, ignore_eos=True))
    assert await drain(replacement) == 63 and await drain(last) == 2
    rows = await rows_once(tmp_path, 4)
    assert sorted(r.outcome for r in rows) == ["cancelled", "success", "success", "success"]
    assert len({r.request_id for r in rows}) == 4


async def test_a_request_the_picker_refuses_gives_its_slot_back(stack_factory, tmp_path: Path) -> None:
    stack = await stack_factory({"w0": engine()}, edge=True, auth=True)
    key = await make_key(stack, "hana", limits=auth_pb.Limits(max_parallel=1))
    # AuthService admits it (reserving the slot); the picker refuses it: no such model.
    refused = await open_stream(
        stack, key, pb.CreateChatCompletionRequest(model="no-such-model", max_tokens=4)
    )
    assert refused == grpc.StatusCode.NOT_FOUND
    call = await admitted_within(stack, key, chat(max_tokens=4, ignore_eos=True), timeout_s=5.0)
    assert await drain(call) == 3
    rows = await rows_once(tmp_path, 2)
    assert sorted((r.outcome, r.prompt_tokens + r.completion_tokens > 0) for r in rows) == [
        ("rejected", False),
        ("success", True),
    ]


async def test_a_request_cancelled_while_it_queues_gives_its_slot_back(stack_factory, tmp_path: Path) -> None:
    """The worker is full (MODEL.max_num_seqs streams on another key), so the key's request waits in
    the picker's queue; its client gives up there. No lease, no worker: the picker still reports it,
    so the key's only slot is free at once instead of after the reservation timeout."""
    stack = await stack_factory({"w0": engine(tokens_per_second=10)}, edge=True, auth=True)
    key = await make_key(stack, "jade", limits=auth_pb.Limits(max_parallel=1))
    busy = [
        await open_stream(stack, stack.admin_key, chat(max_tokens=64, ignore_eos=True))
        for _ in range(MODEL.max_num_seqs)
    ]
    assert not any(isinstance(b, grpc.StatusCode) for b in busy), busy
    queued = stack.models.StreamChatCompletion(chat(max_tokens=4, ignore_eos=True), metadata=bearer(key))
    waiting = asyncio.ensure_future(drain(queued))
    await stack.until_queued(1)
    assert not waiting.done(), "the request should be queued, not answered"
    assert not await admitted_by_check(stack, key)  # it holds the key's slot while it queues
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    deadline = time.monotonic() + 10
    while not await admitted_by_check(stack, key):
        assert time.monotonic() < deadline, "the queued request's slot was not given back"
        await asyncio.sleep(0.05)
    for b in busy:
        assert not isinstance(b, grpc.StatusCode)
        b.cancel()
    rows = await asyncio.to_thread(ledger_rows, tmp_path)
    cancelled = [
        r for r in rows if r.outcome == "cancelled" and r.completion_tokens == 0 and r.prompt_tokens == 0
    ]
    assert len(cancelled) == 1, rows


@pytest.fixture
def doomed_worker(tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Starts a scripted-double worker as a child process (so it can be SIGKILLed) registering with
    the given registry; whatever is left of it is killed at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(registry: str) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable, "-m", "llmesh.bench.scripted_worker",
            "--registry", registry, "--model", MODEL.name, "--worker-id", "doomed",
            "--tokens-per-second", "20", "--max-model-len", str(MODEL.max_model_len),
            "--ready-file", str(tmp_path / "worker.ready.json"), "--log-level", "WARNING",
        ]  # fmt: skip
        with (tmp_path / "worker.log").open("wb") as log:
            started.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def until_ready(proc: subprocess.Popen[bytes], tmp_path: Path, stack: ScriptedStack) -> None:
    deadline = time.monotonic() + 60
    while not (tmp_path / "worker.ready.json").exists():
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the worker process never became ready"
        await asyncio.sleep(0.05)
    await wait_for_edge_workers(stack, 1)


async def test_a_stream_whose_worker_is_killed_is_one_ledger_row_and_its_reservation_is_settled(
    stack_factory, tmp_path: Path, doomed_worker: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    """What the code does: a SIGKILLed worker sends no trailers and no usage, so the picker, after
    the usage desk's wait for the worker's count, reports the request with its own prompt estimate
    and 0 completion tokens, outcome "cancelled" (it cannot tell a dead worker from a client that
    went away). The tokens streamed before the kill are not charged: nobody alive counted them."""
    stack = await stack_factory({}, edge=True, auth=True)
    proc = doomed_worker(stack.addresses["registry"])
    await until_ready(proc, tmp_path, stack)
    key = await make_key(stack, "ivy", limits=auth_pb.Limits(max_parallel=1))
    request = chat(content="tell me a long story", max_tokens=64, ignore_eos=True)
    call = await open_stream(stack, key, request)
    assert not isinstance(call, grpc.StatusCode), call
    received = 1
    async for chunk in call:
        received += len(chunk.choices)
        if received == 5:
            break
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        async for chunk in call:
            received += len(chunk.choices)
    assert cut.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), cut.value
    assert 5 <= received < 64
    rows = await rows_once(tmp_path, 1)
    assert len(rows) == 1, rows
    row = rows[0]
    estimate = read_request(STREAM, grpc_frame(request)).prompt_tokens
    assert (row.outcome, row.prompt_tokens, row.completion_tokens) == ("cancelled", estimate, 0)
    assert row.worker_id == "doomed" and row.model == MODEL.name
    # Settled: the key's only parallel slot is free again (an open reservation would hold it until
    # the reservation timeout, 15 minutes by default). A second row for the id cannot appear: the
    # request id is the ledger's primary key.
    assert await admitted_by_check(stack, key)


async def admitted_by_check(stack: ScriptedStack, key: str) -> bool:
    """Whether AuthService's Check (asked directly: no worker is left to stream to) admits a chat on
    `key`; an admitted one is recorded at once, so asking leaves no reservation open."""
    async with grpc.aio.insecure_channel(stack.addresses["auth"]) as channel:
        request = check_request(STREAM, {"authorization": f"Bearer {key}"}, chat(max_tokens=4))
        response = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(request)
        if response.status.code != code_pb2.OK:
            return False
        rid = header_map(response)["x-llmesh-request-id"]
        await auth_grpc.AuthServiceStub(channel).RecordUsage(
            auth_pb.RecordUsageRequest(request_id=rid, outcome="rejected")
        )
        return True
