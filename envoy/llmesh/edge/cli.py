"""`llmesh envoy-config`: print (or write) the Envoy bootstrap rendered from llmesh's config."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from llmesh.common.config import LlmeshConfig
from llmesh.edge.bootstrap import render_yaml
from llmesh.edge.descriptor import default_descriptor_path
from llmesh.edge.settings import EdgeSettings
from llmesh.edge.validate import EnvoyConfigError, EnvoyNotFound, validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `llmesh envoy-config`."""
    parser.add_argument(
        "--output", "-o", type=Path, default=None, help="write the YAML to this file instead of stdout"
    )
    parser.add_argument(
        "--validate", action="store_true", help="check the result with `envoy --mode validate` first"
    )
    parser.add_argument(
        "--descriptor",
        default=None,
        help="descriptor set path as Envoy will see it (default: the one `make gen` wrote; "
        "in a container, where it is mounted)",
    )
    parser.add_argument(
        "--listen-host", default=None, help="listener address (default: server.host; 0.0.0.0 in a pod)"
    )
    parser.add_argument(
        "--access-log", default=None, help='access log path (default /dev/stdout; "" disables it)'
    )


def settings_from_args(args: argparse.Namespace, cfg: LlmeshConfig) -> EdgeSettings:
    """EdgeSettings from the config, with the command line's overrides."""
    descriptor = args.descriptor if args.descriptor is not None else str(default_descriptor_path())
    settings = EdgeSettings.from_config(cfg, descriptor)
    if args.listen_host is not None:
        settings = dataclasses.replace(settings, listen_host=args.listen_host)
    if args.access_log is not None:
        settings = dataclasses.replace(settings, access_log_path=args.access_log)
    return settings


def envoy_config_main(args: argparse.Namespace, cfg: LlmeshConfig) -> int:
    """Render the edge config; exit status 1 when --validate fails."""
    settings = settings_from_args(args, cfg)
    text = render_yaml(settings)
    if args.validate:
        try:
            validate(text)
        except (EnvoyConfigError, EnvoyNotFound) as error:
            print(f"llmesh envoy-config: {error}", file=sys.stderr)
            return 1
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
