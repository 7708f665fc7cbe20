"""The generator: rendered configs pass `envoy --mode validate`, and say what the edge promises."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmesh.common.config import load_config
from llmesh.edge import EdgeSettings, EdgeSettingsError, render_bootstrap, render_yaml, validate
from llmesh.edge.cli import add_arguments, envoy_config_main
from llmesh.edge.examples import EXAMPLES, default_out_dir
from llmesh.edge.filters import PUBLIC_SERVICES, lua_source
from llmesh.edge.validate import EnvoyConfigError

pytestmark = pytest.mark.envoy


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f["typed_config"] for f in hcm(config)["http_filters"] if f["name"] == name)


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


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
        gateway="127.0.0.1:6001",
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


def test_sidecar_uses_dns_for_service_names() -> None:
    found = clusters(render_bootstrap(EXAMPLES["sidecar.yaml"]))
    assert found["gateway"]["type"] == "STATIC"
    for name in ("registry", "auth", "scheduler"):
        assert found[name]["type"] == "STRICT_DNS"
        assert found[name]["dns_lookup_family"] == "V4_PREFERRED"
    address = found["registry"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "registry", "port_value": 50052}


def test_from_config_follows_llmesh_config(envoy_bin: Path, descriptor_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "llmesh.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"envoy_port": 18081, "envoy_admin_port": 19902, "gateway_port": 7001},
                "endpoints": {"registry": "registry.internal:7002"},
            }
        )
    )
    cfg = load_config(path, env={"LLMESH_SERVER__MAX_REQUEST_BYTES": "2097152"})
    settings = EdgeSettings.from_config(cfg, descriptor_path)
    assert (settings.listen_port, settings.admin_port) == (18081, 19902)
    assert settings.gateway == "127.0.0.1:7001"
    assert settings.registry == "registry.internal:7002"
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
    [("registry", "no-port"), ("auth", "host:99999"), ("gateway", ":50051"), ("listen_port", 70000)],
)
def test_bad_settings_are_rejected(field: str, value: object) -> None:
    with pytest.raises(EdgeSettingsError, match=field):
        EdgeSettings(**{field: value})  # type: ignore[arg-type]


def test_every_upstream_is_a_health_checked_http2_cluster() -> None:
    found = clusters(render_bootstrap(EdgeSettings()))
    assert set(found) == {"gateway", "registry", "auth", "scheduler"}
    for name, cluster in found.items():
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert "http2_protocol_options" in options["explicit_http_config"]
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"]["service_name"].startswith("llmesh.")
        assert check["no_traffic_interval"] == check["interval"]  # checked even while idle
        # No panic routing: an unhealthy host gets no traffic at all.
        assert cluster["common_lb_config"]["healthy_panic_threshold"].get("value", 0) == 0
        assert cluster["type"] == "STATIC", name


def test_routes_never_time_out_streams() -> None:
    config = render_bootstrap(EdgeSettings())
    routes = hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    assert routes
    for route in routes:
        assert route["route"]["timeout"] == "0s"
        assert route["route"]["max_stream_duration"]["grpc_timeout_header_max"] == "0s"
    assert hcm(config)["request_timeout"] == "0s"


def test_size_limits_follow_max_request_bytes() -> None:
    config = render_bootstrap(EdgeSettings(max_request_bytes=3 * 1024 * 1024))
    assert config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 3 * 1024 * 1024
    transcoder = http_filter(config, "envoy.filters.http.grpc_json_transcoder")
    assert transcoder["max_request_body_size"] == 3 * 1024 * 1024


def test_transcoder_prints_what_openai_clients_parse() -> None:
    transcoder = http_filter(render_bootstrap(EdgeSettings()), "envoy.filters.http.grpc_json_transcoder")
    assert transcoder["services"] == list(PUBLIC_SERVICES)
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["request_validation_options"] == {"reject_unknown_method": True}
    assert transcoder["print_options"] == {
        "always_print_primitive_fields": True,
        "preserve_proto_field_names": True,
        "stream_sse_style_delimited": True,
    }  # add_whitespace is false (omitted as the default)


def test_lua_runs_before_the_transcoder() -> None:
    names = [f["name"] for f in hcm(render_bootstrap(EdgeSettings()))["http_filters"]]
    assert names == [
        "envoy.filters.http.lua",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    lua = http_filter(render_bootstrap(EdgeSettings()), "envoy.filters.http.lua")
    assert lua["default_source_code"]["inline_string"] == lua_source()


def test_request_ids_and_json_access_log() -> None:
    manager = hcm(render_bootstrap(EdgeSettings()))
    assert manager["generate_request_id"] is True
    assert manager["preserve_external_request_id"] is True
    assert manager["always_set_request_id_in_response"] is True
    (log,) = manager["access_log"]
    fields = log["typed_config"]["log_format"]["json_format"]
    for key in ("request_id", "method", "path", "status", "grpc_status", "duration_ms", "upstream_host"):
        assert key in fields


def test_local_replies_cover_the_edges_own_errors() -> None:
    mappers = hcm(render_bootstrap(EdgeSettings()))["local_reply_config"]["mappers"]
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


def test_cli_writes_a_sidecar_config(tmp_path: Path) -> None:
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
