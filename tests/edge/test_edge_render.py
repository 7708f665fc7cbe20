"""The generator: rendered configs pass `envoy --mode validate`, and say what the edge promises."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmesh.common.config import load_config
from llmesh.edge import EdgeSettings, EdgeSettingsError, render_bootstrap, render_yaml, validate
from llmesh.edge.cli import add_arguments, envoy_config_main
from llmesh.edge.examples import EXAMPLES, default_out_dir
from llmesh.edge.filters import PUBLIC_SERVICES, lua_source
from llmesh.edge.settings import SERVICE_NAMES
from llmesh.edge.validate import EnvoyConfigError
from llmesh.edge.workers import DESTINATIONS_HEADER, EXT_PROC_FILTER, WORKERS_CLUSTER, inference_paths

pytestmark = pytest.mark.envoy


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f["typed_config"] for f in hcm(config)["http_filters"] if f["name"] == name)


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    (host,) = hcm(config)["route_config"]["virtual_hosts"]
    return list(host["routes"])


@functools.cache
def _default_yaml() -> str:
    return render_yaml(EdgeSettings())


def default_config() -> dict[str, Any]:
    """The default settings' bootstrap (rendering takes a while: once per session, a fresh copy
    per call)."""
    return dict(yaml.safe_load(_default_yaml()))


# ------------------------------------------------------------------ envoy --mode validate


def test_default_config_validates(envoy_bin: Path, descriptor_path: Path) -> None:
    validate(render_yaml(EdgeSettings(descriptor_path=str(descriptor_path))), envoy_bin=envoy_bin)


def test_custom_ports_and_limits_validate(envoy_bin: Path, descriptor_path: Path) -> None:
    settings = EdgeSettings(
        listen_host="0.0.0.0",
        listen_port=18080,
        admin_port=19901,
        max_request_bytes=1024 * 1024,
        access_log_path="",
        descriptor_path=str(descriptor_path),
        registry="[::1]:6002",
        auth="127.0.0.1:6003",
        scheduler="127.0.0.1:6004",
    )
    validate(render_yaml(settings), envoy_bin=envoy_bin)
    config = render_bootstrap(settings)
    assert config["static_resources"]["listeners"][0]["address"]["socket_address"] == {
        "address": "0.0.0.0",
        "port_value": 18080,
    }
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    assert "access_log" not in hcm(config)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_checked_in_examples_validate_and_are_current(
    name: str, envoy_bin: Path, descriptor_path: Path
) -> None:
    settings = EXAMPLES[name]
    text = render_yaml(settings)
    assert (default_out_dir() / name).read_text() == text, "stale: run `python -m llmesh.edge.examples`"
    # The sidecar's descriptor path exists only in the pod; validate with the local one.
    validate(
        render_yaml(dataclasses.replace(settings, descriptor_path=str(descriptor_path))), envoy_bin=envoy_bin
    )


def test_examples_are_the_local_and_kubernetes_edges() -> None:
    assert set(EXAMPLES) == {"local.yaml", "edge.yaml"}
    assert sorted(p.name for p in default_out_dir().glob("*.yaml")) == sorted(EXAMPLES)


def test_kubernetes_edge_uses_dns_for_service_names() -> None:
    found = clusters(render_bootstrap(EXAMPLES["edge.yaml"]))
    assert set(found) == {*SERVICE_NAMES, WORKERS_CLUSTER}
    for name in SERVICE_NAMES:
        assert found[name]["type"] == "STRICT_DNS"
        assert found[name]["dns_lookup_family"] == "V4_PREFERRED"
    address = found["registry"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "registry", "port_value": 50052}
    # Workers (pod IPs) come from the scheduler over EDS, not from DNS.
    assert found[WORKERS_CLUSTER]["type"] == "EDS" and "load_assignment" not in found[WORKERS_CLUSTER]


def test_from_config_follows_llmesh_config(envoy_bin: Path, descriptor_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "llmesh.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"envoy_port": 18081, "envoy_admin_port": 19902, "envoy_worker_threads": 3},
                "endpoints": {"registry": "registry.internal:7002"},
                "scheduler": {"max_queue_wait_seconds": 12},
            }
        )
    )
    cfg = load_config(path, env={"LLMESH_SERVER__MAX_REQUEST_BYTES": "2097152"})
    settings = EdgeSettings.from_config(cfg, descriptor_path)
    assert (settings.listen_port, settings.admin_port) == (18081, 19902)
    assert settings.worker_thread_count() == 3
    assert not hasattr(settings, "gateway")
    assert settings.registry == "registry.internal:7002"
    # Envoy waits for the picker longer than the picker may queue a request.
    assert settings.picker_timeout_s > 12
    assert settings.max_request_bytes == 2097152
    validate(render_yaml(settings), envoy_bin=envoy_bin)


def test_validate_reports_envoys_message(envoy_bin: Path) -> None:
    with pytest.raises(EnvoyConfigError, match=r"nonexistent\.pb"):
        validate(render_yaml(EdgeSettings(descriptor_path="/nonexistent.pb")), envoy_bin=envoy_bin)


# ------------------------------------------------------------------ what the config says


def test_yaml_is_the_rendered_bootstrap() -> None:
    settings = EdgeSettings()
    assert yaml.safe_load(render_yaml(settings)) == render_bootstrap(settings)


def test_admin_stays_on_loopback() -> None:
    with pytest.raises(EdgeSettingsError, match="loopback"):
        EdgeSettings(admin_host="0.0.0.0")
    config = render_bootstrap(EdgeSettings(listen_host="0.0.0.0"))
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("registry", "no-port"),
        ("auth", "host:99999"),
        ("scheduler", ":50051"),
        ("listen_port", 70000),
        ("worker_threads", -1),
        ("workers_initial_fetch_timeout_s", 0),
    ],
)
def test_bad_settings_are_rejected(field: str, value: object) -> None:
    with pytest.raises(EdgeSettingsError, match=field):
        EdgeSettings(**{field: value})  # type: ignore[arg-type]


def test_worker_threads_default_to_one_per_four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, threads in ((1, 1), (2, 1), (7, 1), (8, 2), (64, 16)):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert EdgeSettings().worker_thread_count() == threads
    assert EdgeSettings(worker_threads=5).worker_thread_count() == 5


def http2(cluster: dict[str, Any]) -> bool:
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    return "http2_protocol_options" in options["explicit_http_config"]


def test_every_control_plane_upstream_is_a_health_checked_http2_cluster() -> None:
    found = clusters(default_config())
    assert set(found) == {"registry", "auth", "scheduler", WORKERS_CLUSTER}
    for name in SERVICE_NAMES:
        cluster = found[name]
        assert http2(cluster), name
        (check,) = cluster["health_checks"]
        assert (
            check["grpc_health_check"]["service_name"]
            == {
                "registry": "llmesh.registry.v1.RegistryService",
                "auth": "llmesh.auth.v1.AuthService",
                "scheduler": "llmesh.scheduler.v1.SchedulerService",
            }[name]
        )
        # Lenient: a busy but live service is not ejected; still checked while idle.
        assert (check["interval"], check["timeout"], check["unhealthy_threshold"]) == ("3s", "5s", 3)
        assert check["no_traffic_interval"] == check["interval"]
        # No panic routing: an unhealthy host gets no traffic at all.
        assert cluster["common_lb_config"]["healthy_panic_threshold"].get("value", 0) == 0
        assert cluster["type"] == "STATIC", name


def test_workers_cluster_is_eds_with_override_host_and_outlier_detection() -> None:
    workers = clusters(default_config())[WORKERS_CLUSTER]
    assert workers["type"] == "EDS"
    eds = workers["eds_cluster_config"]
    assert eds["service_name"] == WORKERS_CLUSTER
    (source,) = eds["eds_config"]["api_config_source"]["grpc_services"]
    assert source == {"envoy_grpc": {"cluster_name": "scheduler"}}  # the scheduler answers EDS
    assert eds["eds_config"]["initial_fetch_timeout"] == "15s"
    # With the scheduler down Envoy serves after this long (the catalog needs no workers).
    short = yaml.safe_load(render_yaml(EdgeSettings(workers_initial_fetch_timeout_s=2.5)))
    eds = clusters(short)[WORKERS_CLUSTER]["eds_cluster_config"]
    assert eds["eds_config"]["initial_fetch_timeout"] == "2.500s"
    (policy,) = workers["load_balancing_policy"]["policies"]
    override = policy["typed_extension_config"]
    assert override["name"] == "envoy.load_balancing_policies.override_host"
    assert override["typed_config"]["override_host_sources"] == [{"header": DESTINATIONS_HEADER}]
    outlier = workers["outlier_detection"]
    assert outlier["consecutive_gateway_failure"] == 3
    assert outlier["enforcing_consecutive_gateway_failure"] == 100
    assert outlier["base_ejection_time"] == "10s"
    # Workers are not actively checked (EDS says who is in; outlier detection ejects failures).
    assert "health_checks" not in workers
    assert workers["common_lb_config"]["healthy_panic_threshold"].get("value", 0) == 0
    assert http2(workers)


def test_picker_sits_between_the_transcoder_and_the_router() -> None:
    config = default_config()
    picker = http_filter(config, EXT_PROC_FILTER)
    assert picker["grpc_service"] == {"envoy_grpc": {"cluster_name": "scheduler"}}
    assert not picker.get("failure_mode_allow", False)  # no picker, no routing
    assert picker["status_on_error"] == {"code": "ServiceUnavailable"}
    assert picker["message_timeout"] == "35s"
    mode = picker["processing_mode"]
    # Headers and the body in, the body right behind the headers (the picker answers both at once:
    # one round trip), the response's trailers (usage) in; tokens never.
    assert mode["request_header_mode"] == "SEND" and mode["request_body_mode"] == "STREAMED"
    assert picker["send_body_without_waiting_for_header_response"] is True
    assert mode["response_header_mode"] == "SKIP" and mode["response_trailer_mode"] == "SEND"
    assert mode.get("response_body_mode", "NONE") == "NONE"


def test_picker_is_off_on_control_plane_routes_only() -> None:
    inference = set(inference_paths())
    found = routes(default_config())
    for route in found:
        per_route = route.get("typed_per_filter_config", {})
        if route.get("route", {}).get("cluster") == WORKERS_CLUSTER:
            assert EXT_PROC_FILTER not in per_route, route["name"]
        else:
            assert per_route[EXT_PROC_FILTER]["disabled"] is True, route["name"]
            assert per_route[EXT_PROC_FILTER]["@type"].endswith("ExtProcPerRoute")
    on = {
        r["match"].get("path") for r in found if EXT_PROC_FILTER not in r.get("typed_per_filter_config", {})
    }
    assert inference <= on
    # Only the streaming REST paths besides: after transcoding they match an inference route.
    assert on - inference == {"/v1/chat/completions:stream", "/v1/completions:stream"}


def test_inference_routes_retry_on_fallbacks_before_the_first_byte() -> None:
    by_path = {r["match"].get("path"): r for r in routes(default_config())}
    for path in inference_paths():
        policy = by_path[path]["route"]["retry_policy"]
        assert set(policy["retry_on"].split(",")) == {
            "reset",
            "connect-failure",
            "refused-stream",
            "unavailable",
        }
        assert policy["num_retries"] == 2
    auth = by_path["/llmesh.auth.v1.AuthService/GetMe"]["route"]["retry_policy"]
    assert auth["retry_on"] == "connect-failure,refused-stream"  # never re-run a control-plane RPC


def test_stream_routes_print_only_set_fields() -> None:
    by_path = {r["match"].get("path"): r for r in routes(default_config())}
    for path in ("/v1/chat/completions:stream", "/v1/completions:stream"):
        transcoder = by_path[path]["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]
        assert transcoder["print_options"] == {
            "preserve_proto_field_names": True,
            "stream_sse_style_delimited": True,
        }  # no always_print_primitive_fields, no whitespace
        assert transcoder["services"] == list(PUBLIC_SERVICES)


def test_routes_never_time_out_streams() -> None:
    config = default_config()
    found = routes(config)
    assert found
    assert found[-1]["name"] == "no-route" and found[-1]["direct_response"]["status"] == 404
    for route in found[:-1]:
        assert route["route"]["timeout"] == "0s", route["name"]
        if route["name"].startswith("sse:"):
            continue  # a REST path only: after transcoding the inference route applies
        assert route["route"]["max_stream_duration"]["grpc_timeout_header_max"] == "0s", route["name"]
    assert hcm(config)["request_timeout"] == "0s"


def test_size_limits_follow_max_request_bytes() -> None:
    config = render_bootstrap(EdgeSettings(max_request_bytes=3 * 1024 * 1024))
    assert config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 3 * 1024 * 1024
    transcoder = http_filter(config, "envoy.filters.http.grpc_json_transcoder")
    assert transcoder["max_request_body_size"] == 3 * 1024 * 1024


def test_transcoder_prints_what_openai_clients_parse() -> None:
    transcoder = http_filter(default_config(), "envoy.filters.http.grpc_json_transcoder")
    assert transcoder["services"] == list(PUBLIC_SERVICES)
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["request_validation_options"] == {"reject_unknown_method": True}
    assert transcoder["print_options"] == {
        "always_print_primitive_fields": True,
        "preserve_proto_field_names": True,
        "stream_sse_style_delimited": True,
    }  # add_whitespace is false (omitted as the default)


def test_lua_runs_before_the_transcoder() -> None:
    names = [f["name"] for f in hcm(default_config())["http_filters"]]
    assert names == [
        "envoy.filters.http.lua",
        "envoy.filters.http.grpc_json_transcoder",
        EXT_PROC_FILTER,
        "envoy.filters.http.router",
    ]
    lua = http_filter(default_config(), "envoy.filters.http.lua")
    source = lua["default_source_code"]["inline_string"]
    assert source.endswith(lua_source())
    # The generated table of fields each fixed POST route's body may carry comes first.
    prelude = source.removesuffix(lua_source())
    assert prelude.startswith("-- Generated from the descriptor set") and "local BODY_FIELDS = {" in prelude
    chat = next(line for line in prelude.splitlines() if line.startswith('  ["/v1/chat/completions"]'))
    assert '["max_tokens"] = true' in chat and '["maxTokens"] = true' in chat and '["temprature"]' not in chat
    assert '  ["/v1/models/{model}"]' not in prelude  # paths with variables are not checked


def test_request_ids_and_json_access_log() -> None:
    manager = hcm(default_config())
    assert manager["generate_request_id"] is True
    assert manager["preserve_external_request_id"] is True
    assert manager["always_set_request_id_in_response"] is True
    (log,) = manager["access_log"]
    fields = log["typed_config"]["log_format"]["json_format"]
    for key in ("request_id", "method", "path", "status", "grpc_status", "duration_ms", "upstream_host"):
        assert key in fields


def test_local_replies_cover_the_edges_own_errors() -> None:
    mappers = hcm(default_config())["local_reply_config"]["mappers"]
    statuses = {
        m["filter"]["and_filter"]["filters"][0]["status_code_filter"]["comparison"]["value"]["default_value"]
        for m in mappers
    }
    assert {400, 404, 413, 429, 503} <= statuses


# ------------------------------------------------------------------ the CLI


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_prints_the_config(capsys: pytest.CaptureFixture[str], descriptor_path: Path) -> None:
    cfg = load_config(None)
    assert envoy_config_main(parse("--validate"), cfg) == 0
    printed = capsys.readouterr().out
    assert printed == render_yaml(EdgeSettings.from_config(cfg, descriptor_path))


def test_cli_writes_an_edge_config(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    args = parse(
        "--output", str(out), "--listen-host", "0.0.0.0", "--access-log", "", "--descriptor", "/x.pb"
    )
    assert envoy_config_main(args, load_config(None)) == 0
    config = yaml.safe_load(out.read_text())
    assert config["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] == "0.0.0.0"
    assert http_filter(config, "envoy.filters.http.grpc_json_transcoder")["proto_descriptor"] == "/x.pb"


def test_cli_validate_fails_loudly(capsys: pytest.CaptureFixture[str]) -> None:
    assert envoy_config_main(parse("--validate", "--descriptor", "/nonexistent.pb"), load_config(None)) == 1
    assert "nonexistent.pb" in capsys.readouterr().err
