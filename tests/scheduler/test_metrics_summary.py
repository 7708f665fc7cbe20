"""GET /v1/monitoring/metrics: the scheduler's JSON traffic summary for people without Prometheus.

The summary's arithmetic (nearest-rank percentiles, the window, refusals) on `TrafficSummary`
itself; then through a real Envoy with auth on, in front of real registry, scheduler and auth
servers and a worker on the ScriptedEngine double (this is about the summary, not inference): the
counts move by exactly the requests and tokens sent, an admin reads it, a user gets 403, no
credentials 401, a bad window 400.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from llmesh.common.errors import InvalidRequest
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.scheduler.traffic import UNRESOLVED, TrafficSummary, percentiles, window_of
from tests.auth.test_auth_through_envoy import bearer, make_key
from tests.scripted_stack import MODEL, ScriptedStack, chat, engine, settled

PATH = "/v1/monitoring/metrics"


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    p = percentiles(values)
    assert (p.samples, p.p50_ms, p.p90_ms, p.p99_ms) == (100, 50.0, 90.0, 99.0)
    one = percentiles([0.25])
    assert (one.samples, one.p50_ms, one.p99_ms) == (1, 250.0, 250.0)
    assert percentiles([]).samples == 0 and percentiles([]).p99_ms == 0.0


def test_counts_run_since_start_and_percentiles_cover_the_window() -> None:
    now = [1000.0]
    traffic = TrafficSummary(clock=lambda: now[0])
    traffic.finished("m", "OK", 10, 5, (0.1, 0.4))  # TPOT (0.4 s / 4 gaps) = 100 ms
    now[0] += 200
    traffic.finished("m", "OK", 7, 1, (0.3, 0.0))  # one token: a TTFT, no TPOT
    traffic.finished("m", "CANCELLED", 3, 0, None)  # no chunk came: no timing
    traffic.unleased("m", "RESOURCE_EXHAUSTED")
    traffic.unleased("", "NOT_FOUND")

    (m, unresolved) = sorted(traffic.view(300), key=lambda v: v.model != "m")
    assert unresolved.model == UNRESOLVED and unresolved.totals.by_status == {"NOT_FOUND": 1}
    assert m.totals.requests == 4
    assert m.totals.by_status == {"OK": 2, "CANCELLED": 1, "RESOURCE_EXHAUSTED": 1}
    assert (m.totals.prompt_tokens, m.totals.completion_tokens) == (20, 6)
    assert (m.ttft.samples, m.ttft.p50_ms, m.ttft.p99_ms) == (2, 100.0, 300.0)
    assert (m.tpot.samples, m.tpot.p50_ms) == (1, 100.0)
    # 100 s back only the later request is in the window; the counts do not change.
    (recent,) = [v for v in traffic.view(100) if v.model == "m"]
    assert (recent.ttft.samples, recent.ttft.p50_ms, recent.tpot.samples) == (1, 300.0, 0)
    assert recent.totals.requests == 4


def test_window_is_checked() -> None:
    assert window_of(0) == 300 and window_of(1) == 1 and window_of(3600) == 3600
    with pytest.raises(InvalidRequest, match="window_seconds 3601 is out of range"):
        window_of(3601)


async def _summary(client: httpx.AsyncClient, key: str, **params: Any) -> dict[str, Any]:
    auth = {"authorization": f"Bearer {key}"} if key else {}
    response = await client.get(PATH, params=params, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


def _model(summary: dict[str, Any], name: str) -> dict[str, Any]:
    found = [m for m in summary["models"] if m["model"] == name]
    return found[0] if found else {"requests": "0", "requests_by_status": {}, "prompt_tokens": "0",
                                   "completion_tokens": "0"}  # fmt: skip


@pytest.mark.envoy
async def test_the_summary_through_envoy_counts_exactly_what_was_sent(stack_factory) -> None:
    stack: ScriptedStack = await stack_factory({"w0": engine()}, edge=True, auth=True)
    admin = stack.admin_key
    async with httpx.AsyncClient(base_url=stack.envoy.url, timeout=30) as client:
        before = await _summary(client, admin)
        prompt_tokens = 0
        for max_tokens in (3, 4):
            response = await client.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL.name,
                    "messages": [{"role": "user", "content": "hi there"}],
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                },
                headers={"authorization": f"Bearer {admin}"},
            )
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            assert usage["completion_tokens"] == max_tokens
            prompt_tokens += usage["prompt_tokens"]
        chunks = [
            c
            async for c in stack.models.StreamChatCompletion(
                chat(max_tokens=5, ignore_eos=True, stream_options=pb.StreamOptions(include_usage=True)),
                metadata=bearer(admin),
            )
        ]
        assert sum(1 for c in chunks if c.choices) == 5
        prompt_tokens += next(c.usage.prompt_tokens for c in chunks if c.HasField("usage"))
        refused = await client.post(
            "/v1/chat/completions",
            json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {admin}"},
        )
        assert refused.status_code == 404, refused.text
        await settled(stack)
        after = await _summary(client, admin)

        user = await make_key(stack, "alice")
        forbidden = await client.get(PATH, headers={"authorization": f"Bearer {user}"})
        assert forbidden.status_code == 403, forbidden.text
        anonymous = await client.get(PATH)
        assert anonymous.status_code == 401, anonymous.text
        bad = await client.get(
            PATH, params={"window_seconds": 7200}, headers={"authorization": f"Bearer {admin}"}
        )
        assert bad.status_code == 400, bad.text
        assert "window_seconds 7200" in bad.text
        narrow = await _summary(client, admin, window_seconds=60)

    was, now = _model(before, MODEL.name), _model(after, MODEL.name)
    # proto3 JSON writes 64-bit integers as strings.
    assert int(now["requests"]) - int(was["requests"]) == 3
    assert int(now["requests_by_status"]["OK"]) - int(was["requests_by_status"].get("OK", "0")) == 3
    assert int(now["completion_tokens"]) - int(was["completion_tokens"]) == 3 + 4 + 5
    assert int(now["prompt_tokens"]) - int(was["prompt_tokens"]) == prompt_tokens
    assert int(after["requests"]) - int(before["requests"]) == 4  # the refused one too
    unresolved = _model(after, "(unresolved)")
    assert (
        int(unresolved["requests_by_status"]["NOT_FOUND"])
        - int(_model(before, "(unresolved)")["requests_by_status"].get("NOT_FOUND", "0"))
        == 1
    )
    ttft, tpot = now["time_to_first_token"], now["time_per_output_token"]
    assert ttft["samples"] == 3 and tpot["samples"] == 3  # every request had at least two tokens
    assert 0 < ttft["p50_ms"] <= ttft["p90_ms"] <= ttft["p99_ms"]
    assert 0 < tpot["p50_ms"] <= tpot["p99_ms"]
    assert after["window_seconds"] == 300 and narrow["window_seconds"] == 60
    assert after["since"].endswith("Z")
    assert now["waiting"] == 0 and now["active"] == 0
    assert after["workers_by_state"] == {"ready": 1}
    (worker,) = after["workers"]
    assert worker["worker_id"] == "w0" and worker["state"] == "ready"
    assert worker["models"] == [MODEL.name] and worker["active_requests"] == 0
    assert worker["capacity"] == MODEL.max_num_seqs


@pytest.mark.envoy
async def test_a_request_cancelled_while_it_queues_counts_as_cancelled(stack_factory) -> None:
    """No lease, no worker, no trailers: the picker still counts it, under its model."""
    stack: ScriptedStack = await stack_factory({"w0": engine(tokens_per_second=10)}, edge=True)
    assert stack.models is not None
    async with httpx.AsyncClient(base_url=stack.envoy.url, timeout=30) as client:
        before = _model(await _summary(client, ""), MODEL.name)
        busy = [
            stack.models.StreamChatCompletion(chat(max_tokens=64, ignore_eos=True))
            for _ in range(MODEL.max_num_seqs)
        ]
        for call in busy:
            await call.read()  # streaming: the worker is full
        queued = stack.models.StreamChatCompletion(chat(max_tokens=4, ignore_eos=True))
        waiting = asyncio.ensure_future(queued.read())
        await stack.until_queued(1)
        assert not waiting.done(), "the request should wait in the picker's queue"
        assert _model(await _summary(client, ""), MODEL.name)["waiting"] == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for call in busy:
            call.cancel()
        await settled(stack)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            now = _model(await _summary(client, ""), MODEL.name)
            if int(now["requests"]) - int(before["requests"]) == 3:
                break
            assert asyncio.get_running_loop().time() < deadline, now
            await asyncio.sleep(0.05)
    # The two streams cancelled mid-way and the one cancelled in the queue; no other status.
    gained = {
        status: int(n) - int(before["requests_by_status"].get(status, "0"))
        for status, n in now["requests_by_status"].items()
    }
    assert {s: n for s, n in gained.items() if n} == {"CANCELLED": 3}
    assert now["waiting"] == 0 and now["active"] == 0
