"""Client channels between llmesh services: keepalive so dead peers are noticed quickly."""

from __future__ import annotations

from grpc import aio

from llmesh.common.grpc_metrics import client_metrics_interceptors
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


def insecure_channel(address: str) -> aio.Channel:
    """An asyncio client channel with llmesh's keepalive settings, its calls counted (and
    traced, with `traceparent` sent, when tracing is on)."""
    return aio.insecure_channel(
        address,
        options=channel_options(),
        interceptors=[*client_metrics_interceptors(), *client_interceptors()],  # type: ignore[list-item]  # grpc-stubs' aio types are partial
    )
