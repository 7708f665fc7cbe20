"""Metrics on the real stack: chats streamed through Envoy to the vLLM workers move the workers' and
the scheduler's counters by exactly the tokens the responses reported, and every process serves
its `/metrics` side port (the URL it put in its ready file, as `llmesh up` prints it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.support import VllmStack, require

pytestmark = pytest.mark.vllm

Samples = list[tuple[str, dict[str, str], float]]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story"}]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, f"{url}: {response.status_code}"
    return [
        (s.name, s.labels, s.value) for f in text_string_to_metric_families(response.text) for s in f.samples
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items()))


def metrics_url(stack: VllmStack, child: str) -> str:
    url = stack.stack.child(child).info.get("metrics_url")
    assert url, f"{child} reported no metrics_url in its ready file: {stack.stack.child(child).info}"
    return str(url)


def worker_urls(stack: VllmStack) -> list[str]:
    return [metrics_url(stack, worker_id) for worker_id in stack.workers]


def over_workers(stack: VllmStack) -> Callable[..., float]:
    """A reader of one metric summed over every worker's scrape, taken now."""
    scrapes = [scrape(url) for url in worker_urls(stack)]
    return lambda name, **labels: sum(total(s, name, **labels) for s in scrapes)


async def settle(read: Callable[[], float], want: float, timeout_s: float = 10.0) -> float:
    """Poll until `read()` reaches `want` (the picker settles usage just after the client's last
    byte), then give it a moment to overshoot, which would be a double count."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while value < want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = read()
    await asyncio.sleep(0.5)
    return read()


async def test_streamed_chats_move_the_token_counters_by_exactly_the_usage_reported(
    vllm_stack: VllmStack,
) -> None:
    require(bool(vllm_stack.edge), "Envoy is not installed (pip install -e '.[edge]')")
    model = vllm_stack.model
    scheduler_url = metrics_url(vllm_stack, "scheduler")
    before_workers = over_workers(vllm_stack)
    before_sched = scrape(scheduler_url)

    client = openai.AsyncOpenAI(base_url=f"http://{vllm_stack.edge}/v1", api_key="unused", max_retries=0)
    prompt = completion = chunks_seen = 0
    streams = [3, 5, 8, 13]
    for max_tokens in streams:
        stream = await client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        chunks_seen += sum(1 for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == max_tokens
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
    reply = await client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=4,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None
    prompt += reply.usage.prompt_tokens
    completion += reply.usage.completion_tokens
    requests = len(streams) + 1

    # The scheduler (the picker) accounts each request once, from the worker's trailers.
    def sched(name: str, **labels: str) -> float:
        return total(scrape(scheduler_url), name, **labels) - total(before_sched, name, **labels)

    got = await settle(lambda: sched("llmesh_usage_tokens_total", model=model, type="completion"), completion)
    assert got == completion
    assert sched("llmesh_usage_tokens_total", model=model, type="prompt") == prompt
    assert sched("llmesh_scheduler_lease_decisions_total", model=model, outcome="granted") == requests
    assert sched("llmesh_scheduler_lease_releases_total", model=model, outcome="success") == requests
    assert sched("llmesh_scheduler_queue_wait_seconds_count", model=model) == requests
    after_sched = scrape(scheduler_url)
    assert total(after_sched, "llmesh_scheduler_leases_in_flight", model=model) == 0
    assert total(after_sched, "llmesh_scheduler_workers", model=model, state="ready") == len(
        vllm_stack.workers
    )
    assert total(after_sched, "llmesh_scheduler_queue_depth", model=model) == 0
    # Envoy's ext_proc streams to the picker: one per request, counted when each ended.
    assert (
        sched(
            "grpc_server_handled_total",
            grpc_service="envoy.service.ext_proc.v3.ExternalProcessor",
            grpc_method="Process",
        )
        >= requests
    )

    # The workers: vLLM's names, our labels, the exact tokens.
    def workers(name: str, **labels: str) -> float:
        return over_workers(vllm_stack)(name, **labels) - before_workers(name, **labels)

    got = await settle(lambda: workers("vllm:generation_tokens_total", model_name=model), completion)
    assert got == completion
    assert workers("vllm:prompt_tokens_total", model_name=model) == prompt
    assert workers("vllm:request_success_total", model_name=model, finished_reason="length") == requests
    assert workers("vllm:time_to_first_token_seconds_count", model_name=model) == requests
    assert workers("vllm:e2e_request_latency_seconds_count", model_name=model) == requests
    # The engine's per-step stats reach the worker's metrics too: one queue time per request.
    queued = await settle(
        lambda: workers("vllm:request_queue_time_seconds_count", model_name=model), requests
    )
    assert queued == requests
    # One inter-chunk gap per chunk after the first of each request: between the tokens (each
    # stream's chunks carried at least one token) and the chunks the engine sent.
    gaps = workers("vllm:inter_token_latency_seconds_count", model_name=model)
    assert 0 < gaps <= completion - requests
    assert workers(
        "gen_ai_client_token_usage_sum", gen_ai_request_model=model, gen_ai_token_type="output"
    ) == (completion)
    assert (
        workers("gen_ai_client_token_usage_sum", gen_ai_request_model=model, gen_ai_token_type="input")
        == prompt
    )
    assert (
        workers("gen_ai_server_time_to_first_token_seconds_count", gen_ai_operation_name="chat") == requests
    )
    assert (
        workers("gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model=model) == requests
    )
    assert workers(
        "grpc_server_handled_total",
        grpc_service="llmesh.model.v1.ModelService",
        grpc_method="StreamChatCompletion",
        grpc_code="OK",
    ) == len(streams)
    now = over_workers(vllm_stack)
    assert now("vllm:num_requests_running", model_name=model) == 0
    for worker_id in vllm_stack.workers:
        assert any(
            n == "vllm:kv_cache_usage_perc" and ls.get("worker") == worker_id
            for n, ls, _ in scrape(metrics_url(vllm_stack, worker_id))
        )


def test_every_process_serves_metrics_and_the_registry_counts_heartbeats(vllm_stack: VllmStack) -> None:
    registry_url = metrics_url(vllm_stack, "registry")
    heartbeats = {"grpc_service": "llmesh.registry.v1.RegistryService", "grpc_method": "Heartbeat"}
    first = total(scrape(registry_url), "grpc_server_handled_total", grpc_code="OK", **heartbeats)
    # Workers heartbeat every second in the test stack.
    deadline = time.monotonic() + 10
    while total(scrape(registry_url), "grpc_server_handled_total", grpc_code="OK", **heartbeats) <= first:
        assert time.monotonic() < deadline, "no worker heartbeat counted by the registry in 10 s"
        time.sleep(0.2)
    auth = scrape(metrics_url(vllm_stack, "auth"))
    assert any(n == "llmesh_auth_denials_total" and ls == {"reason": "unauthenticated"} for n, ls, _ in auth)
    for child in ("registry", "scheduler", "auth", *vllm_stack.workers):
        assert total(scrape(metrics_url(vllm_stack, child)), "process_cpu_seconds_total") > 0
