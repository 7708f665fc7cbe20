"""Header (gRPC metadata) names the platform sets on a request as it crosses the mesh.

Clients never set `x-llmesh-*` headers: the edge strips them on arrival, then AuthService
(ext_authz) and the endpoint picker (ext_proc) set the ones below.
"""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "x-llmesh-"
# The platform's id of one request: engine request id, lease key and usage ledger key. Minted by
# AuthService when auth runs, else by the picker; a client's x-request-id is only logged.
REQUEST_ID = "x-llmesh-request-id"
# Set by the picker: the lease this request runs under, the catalog name the model (or alias)
# resolved to, and the workers Envoy may send it to, best first (override_host's source).
LEASE_ID = "x-llmesh-lease-id"
MODEL = "x-llmesh-model"
DESTINATIONS = "x-llmesh-destinations"
# Set by the edge's Lua filter on REST requests answered as server-sent events: the worker then
# ends the stream with the message the edge turns into `data: [DONE]`.
SSE = "x-llmesh-sse"
# Trailers a worker sets on every inference response, for the picker (accounting, outcome).
PROMPT_TOKENS = "x-llmesh-prompt-tokens"
COMPLETION_TOKENS = "x-llmesh-completion-tokens"
WORKER_ID = "x-llmesh-worker-id"
# The worker's timing of a generation, in microseconds: arrival to first chunk, first to last chunk
# (the picker's latency percentiles; absent when no chunk came).
TTFT_US = "x-llmesh-ttft-us"
DECODE_US = "x-llmesh-decode-us"
# The caller's own id, echoed for logs only.
CLIENT_REQUEST_ID = "x-request-id"


def header(metadata: Iterable[tuple[str, str | bytes]] | None, name: str) -> str:
    """The first value of `name` in gRPC metadata, or ""."""
    for key, value in metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""
