"""Client channels between llmesh services: keepalive so dead peers are noticed quickly, and mTLS
when this process has a mesh identity (`llmesh up --tls`, see llmesh.common.tls)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpc import aio

from llmesh.common.grpc_metrics import client_metrics_interceptors
from llmesh.common.tls import mesh_identity
from llmesh.common.tracing import client_interceptors


def channel_options() -> list[tuple[str, int]]:
    """Client channel arguments: keepalive so dead peers are noticed, generous message limits."""
    return [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.enable_retries", 1),
        # gRPC's default reconnect backoff grows to 120 s; services restart in seconds here.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def peer_channel(address: str, peer: str = "", interceptors: Sequence[Any] = ()) -> aio.Channel:
    """A channel to the service whose mesh identity is `peer` (registry, scheduler, auth, workers).

    Plaintext unless this process has a mesh identity; then mTLS: we present our certificate, and
    the server's must chain to the mesh CA and name `peer` (a DNS SAN of `llmesh certs`), whatever
    `address` says (empty `peer`: the server must name `address`'s host).
    """
    identity = mesh_identity()
    if identity is None:
        return aio.insecure_channel(address, options=channel_options(), interceptors=interceptors)
    options: list[tuple[str, Any]] = channel_options()
    if peer:
        options.append(("grpc.ssl_target_name_override", peer))
    return aio.secure_channel(
        address, identity.channel_credentials(), options=options, interceptors=interceptors
    )


def service_channel(address: str, peer: str = "") -> aio.Channel:
    """`peer_channel` with its calls counted (and traced, with `traceparent` sent, when
    tracing is on)."""
    return peer_channel(address, peer, [*client_metrics_interceptors(), *client_interceptors()])
