"""Envoy with the endpoint picker taken out, for the overhead benchmark ONLY.

The same bootstrap `llmesh up` runs, changed on the inference routes alone: ext_proc is disabled
there and the route itself names the one worker (`x-llmesh-destinations`, which the workers
cluster's override_host policy reads). Every other filter, the transcoder, the clusters, EDS and
the upstream connection stay as they are, so TTFT through this Envoy against TTFT through the real
one is what the picker (its ext_proc exchange and the lease) adds. It never serves users: nothing
is queued, leased or accounted on this path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmesh.edge.process import EnvoyProcess
from llmesh.edge.settings import EdgeSettings
from llmesh.edge.workers import DESTINATIONS_HEADER, EXT_PROC_FILTER, WORKERS_CLUSTER

_EXT_PROC_OFF = {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
    "disabled": True,
}


def without_picker(bootstrap: dict[str, Any], worker_address: str) -> int:
    """Turn the picker off on every route to the workers cluster and send those requests to
    `worker_address`; returns how many routes changed."""
    changed = 0
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                route_config = network_filter.get("typed_config", {}).get("route_config", {})
                for host in route_config.get("virtual_hosts", []):
                    for route in host.get("routes", []):
                        if route.get("route", {}).get("cluster") != WORKERS_CLUSTER:
                            continue
                        route.setdefault("typed_per_filter_config", {})[EXT_PROC_FILTER] = _EXT_PROC_OFF
                        route["request_headers_to_add"] = [
                            {
                                "header": {"key": DESTINATIONS_HEADER, "value": worker_address},
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                            }
                        ]
                        changed += 1
    return changed


class PickerFreeEnvoy(EnvoyProcess):
    """The edge as `llmesh up` renders it, minus the picker on the inference routes."""

    def __init__(self, settings: EdgeSettings, run_dir: Path, worker_address: str) -> None:
        super().__init__(settings, run_dir)
        self._worker_address = worker_address

    def render(self) -> str:
        bootstrap = yaml.safe_load(super().render())
        if without_picker(bootstrap, self._worker_address) == 0:
            raise RuntimeError(f"the rendered edge has no route to {WORKERS_CLUSTER}")
        return yaml.safe_dump(bootstrap, sort_keys=False)
