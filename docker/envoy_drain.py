#!/usr/bin/env python3
"""envoy-drain: the edge's preStop hook. Envoy stops taking new connections and tells clients to
go elsewhere (GOAWAY / Connection: close); in-flight token streams finish. Returns once none are
left, or after the deadline (the pod's terminationGracePeriodSeconds leaves room for it); then the
kubelet's SIGTERM stops Envoy.

    envoy-drain [DEADLINE_SECONDS] [MIN_SECONDS]

MIN_SECONDS (default 5) is waited in any case, so load balancers notice the endpoint is gone.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request

ADMIN = os.environ.get("ENVOY_ADMIN_URL", "http://127.0.0.1:9901")
# The public listener's HTTP connection manager (llmesh.edge.bootstrap's stat prefix).
ACTIVE_STAT = "http.llmesh_edge.downstream_rq_active"


def active_requests() -> int:
    with urllib.request.urlopen(f"{ADMIN}/stats?filter=^{ACTIVE_STAT}$", timeout=2) as reply:
        for line in reply.read().decode().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == ACTIVE_STAT:
                return int(value.strip())
    return 0


def main(argv: list[str]) -> int:
    deadline_s = float(argv[0]) if argv else 45.0
    min_s = float(argv[1]) if len(argv) > 1 else 5.0
    began = time.monotonic()
    try:
        request = urllib.request.Request(f"{ADMIN}/drain_listeners?graceful&inboundonly", method="POST")
        urllib.request.urlopen(request, timeout=2).close()
    except (urllib.error.URLError, OSError) as error:
        print(f"envoy-drain: admin not reachable ({error}); waiting {min_s}s only", file=sys.stderr)
        time.sleep(min_s)
        return 0
    while time.monotonic() - began < deadline_s:
        try:
            active = active_requests()
        except (urllib.error.URLError, OSError, ValueError):
            active = 0
        if active == 0 and time.monotonic() - began >= min_s:
            return 0
        time.sleep(1.0)
    print(f"envoy-drain: streams still open after {deadline_s}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
