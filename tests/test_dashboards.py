"""The Grafana dashboard and the Prometheus alert rules query only metrics llmesh emits.

The emitted names come from the metric definitions themselves (llmesh's registry, with each
type's sample suffixes), not from a list kept by hand, so renaming a metric in code without
updating a query fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import llmesh.auth.metrics
import llmesh.common.grpc_metrics
import llmesh.scheduler.metrics
import llmesh.worker.metrics  # noqa: F401 - each module defines its metrics on import
from llmesh.common.metrics import REGISTRY, exposed_names

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "llmesh-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "llmesh-alerts.yaml"
SCRAPE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
KEDA = ROOT / "k8s" / "components" / "keda-workers" / "scaledobject.yaml"
# Written by Prometheus itself for every scrape target, not by the target.
PROMETHEUS_OWN = {"up"}
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_NOT_METRICS |= {"and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label names, functions, keywords, Grafana
    variables and durations are not names)."""
    grafana = re.match(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)", expr)
    if grafana:
        return {grafana.group(1)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if match.group(0).lower() not in _NOT_METRICS:
            names.add(match.group(0))
    return names


@pytest.fixture(scope="module")
def emitted() -> set[str]:
    return exposed_names(REGISTRY)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and template variable of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))

    walk(board["panels"])
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"variable {variable['name']}", variable["query"]["query"]))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_the_name_extractor_finds_metrics_and_only_metrics(emitted: set[str]) -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, model_name) (rate(vllm:time_to_first_token_seconds_bucket"
        '{model_name=~"$model", worker!="a b"}[$__rate_interval]))) / on (worker) group_left '
        "made_up_metric_total offset 5m > 2e3 and bool up"
    )
    assert metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket", "made_up_metric_total", "up"}
    assert "made_up_metric_total" not in emitted
    assert metric_names('label_values(vllm:num_requests_running{model_name=~"$m"}, worker)') == {
        "vllm:num_requests_running"
    }


def test_emitted_names_come_from_the_definitions(emitted: set[str]) -> None:
    # Histograms expose _bucket/_sum/_count, counters _total, collector gauges their own name.
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "gen_ai_server_time_per_output_token_seconds_bucket",
        "gen_ai_server_request_duration_seconds_bucket",
        "gen_ai_client_token_usage_bucket",
        "llmesh_scheduler_queue_depth",
        "grpc_server_handled_total",
    ):
        assert name in emitted, name
    assert "vllm:time_to_first_token_seconds" not in emitted  # a histogram has no bare series


def test_every_dashboard_query_names_only_emitted_metrics(emitted: set[str]) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    unknown = {(where, name) for where, expr in queries for name in metric_names(expr) - emitted}
    assert not unknown, f"the dashboard queries metrics llmesh does not emit: {sorted(unknown)}"


def test_every_alert_names_only_emitted_metrics(emitted: set[str]) -> None:
    rules = alert_rules()
    unknown = {
        (rule["alert"], name)
        for rule in rules
        for name in metric_names(rule["expr"]) - emitted - PROMETHEUS_OWN
    }
    assert not unknown, f"alert rules query metrics llmesh does not emit: {sorted(unknown)}"


def test_the_autoscaler_queries_a_metric_the_scheduler_emits(emitted: set[str]) -> None:
    keda = yaml.safe_load(KEDA.read_text())
    for trigger in keda["spec"]["triggers"]:
        names = metric_names(trigger["metadata"]["query"])
        assert names and names <= emitted, names


def test_the_dashboard_covers_latency_throughput_queues_cache_and_errors() -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    read = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            read |= metric_names(target["expr"])
    assert {
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:generation_tokens_total",
        "llmesh_scheduler_queue_depth",
        "vllm:kv_cache_usage_perc",
        "vllm:request_success_total",
        "grpc_server_handled_total",
    } <= read
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for quantile in ("histogram_quantile(0.5,", "histogram_quantile(0.99,"):
        assert quantile in exprs
    # Error rates split per model and per worker.
    assert (
        'sum by (model_name) (rate(vllm:request_success_total{model_name=~"$model", finished_reason="error"}'
        in exprs
    )
    assert "sum by (worker) (rate(vllm:request_success_total{" in exprs


def test_the_alerts_cover_ttft_kv_cache_queue_worker_down_and_error_burn() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for name in (
        "LlmeshHighTimeToFirstToken",
        "LlmeshKVCacheNearlyFull",
        "LlmeshQueueGrowing",
        "LlmeshWorkerDown",
        "LlmeshErrorBudgetFastBurn",
        "LlmeshErrorBudgetSlowBurn",
    ):
        assert name in rules, name
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
    assert "> 0.9" in rules["LlmeshKVCacheNearlyFull"]["expr"]
    # The worker-down alert's job is one the example scrape config defines.
    jobs = {job["job_name"] for job in yaml.safe_load(SCRAPE.read_text())["scrape_configs"]}
    job = re.search(r'job="([^"]+)"', rules["LlmeshWorkerDown"]["expr"])
    assert job and job.group(1) in jobs
