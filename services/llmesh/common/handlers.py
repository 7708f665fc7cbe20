"""Rebuilding a gRPC method handler around a wrapped behaviour, as server interceptors do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

# A handler's behaviour attribute (one is set, by the RPC's shape) -> how to make such a handler.
HANDLER_MAKERS: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def with_behavior(
    handler: grpc.RpcMethodHandler, attr: str, behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler:
    """`handler` with `behavior` in place of its `attr` (unary_unary ...), serializers kept."""
    return HANDLER_MAKERS[attr](
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
