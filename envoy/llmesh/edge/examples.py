"""The example configs checked in under envoy/rendered/, and the command that re-renders them.

python -m llmesh.edge.examples            # rewrite envoy/rendered/*.yaml
python -m llmesh.edge.examples --check    # fail if they are stale (tests do this too)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmesh.edge.bootstrap import render_yaml
from llmesh.edge.settings import EdgeSettings

# Where a pod mounts the descriptor set (a ConfigMap built from gen/llmesh/llmesh_descriptor.pb).
SIDECAR_DESCRIPTOR_PATH = "/etc/llmesh/envoy/llmesh_descriptor.pb"

EXAMPLES: dict[str, EdgeSettings] = {
    # `llmesh up` on one machine: every service on loopback, run from the repository root.
    "local.yaml": EdgeSettings(),
    # Envoy as the edge Deployment in Kubernetes: the control-plane services by their Service
    # names; workers come from the scheduler over EDS (pod IPs).
    "edge.yaml": EdgeSettings(
        listen_host="0.0.0.0",
        registry="registry:50052",
        auth="auth:50053",
        scheduler="scheduler:50054",
        descriptor_path=SIDECAR_DESCRIPTOR_PATH,
    ),
}


def default_out_dir() -> Path:
    """envoy/rendered/ of the source tree this module lives in."""
    return Path(__file__).resolve().parents[2] / "rendered"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmesh.edge.examples", description=__doc__)
    parser.add_argument("--out", type=Path, default=default_out_dir())
    parser.add_argument("--check", action="store_true", help="only report stale files")
    ns = parser.parse_args(argv)
    stale = []
    for name, settings in EXAMPLES.items():
        path = ns.out / name
        text = render_yaml(settings)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not ns.check:
            ns.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'stale' if ns.check else 'wrote'}: {path}", file=sys.stderr)
    return 1 if ns.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
