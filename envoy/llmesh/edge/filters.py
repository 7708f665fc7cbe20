"""The HTTP filters and listener-level pieces of the edge: Lua, the transcoder, local replies, logs.

Filter order matters: Lua reads the body and picks the streaming RPC's path first, then the
transcoder turns JSON into gRPC (and gRPC statuses back into HTTP ones), then the endpoint picker
(llmesh.edge.workers) chooses a worker for inference RPCs, then the router.
"""

from __future__ import annotations

from importlib import resources

import betterproto2
from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    AndFilter,
    ComparisonFilter,
    ComparisonFilterOp,
    MetadataFilter,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.core.v3 import DataSource, RuntimeUInt32, SubstitutionFormatString
from envoy_data_plane.envoy.extensions.access_loggers.file.v3 import FileAccessLog
from envoy_data_plane.envoy.extensions.filters.http.grpc_json_transcoder.v3 import (
    GrpcJsonTranscoder,
    GrpcJsonTranscoderPrintOptions,
    GrpcJsonTranscoderRequestValidationOptions,
    GrpcJsonTranscoderUrlUnescapeSpec,
)
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.type.matcher.v3 import MetadataMatcher, MetadataMatcherPathSegment, ValueMatcher
from envoy_data_plane.google.protobuf import Any as PbAny
from envoy_data_plane.google.protobuf import Struct

from llmesh.edge.descriptor import HttpRoute, default_descriptor_path, http_routes
from llmesh.edge.settings import GRPC_SERVICE_OF, MODEL_SERVICE, EdgeSettings

# Services the transcoder exposes over REST: every one with google.api.http annotations.
# (WorkerService is internal: Envoy reaches workers only through ModelService's RPCs.)
PUBLIC_SERVICES: tuple[str, ...] = (MODEL_SERVICE, *GRPC_SERVICE_OF.values())

# Dynamic metadata namespace the Lua filter writes (see lua/edge.lua).
EDGE_METADATA_NAMESPACE = "llmesh.edge"

# HTTP status -> OpenAI error type, for replies Envoy makes itself (bad JSON, too large, no
# upstream). Upstream gRPC errors are reshaped by the Lua filter with the same table.
LOCAL_REPLY_ERROR_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "timeout_error",
}

# The `code` of Envoy's own errors, in the style of gRPC status names that upstream errors carry.
LOCAL_REPLY_CODE: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    408: "DEADLINE_EXCEEDED",
    413: "REQUEST_TOO_LARGE",
    429: "RESOURCE_EXHAUSTED",
    431: "INVALID_ARGUMENT",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

# One JSON line per request.
ACCESS_LOG_FORMAT: dict[str, str] = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    # The transcoder turns every REST call into a POST; Lua keeps what the client sent.
    "method": "%DYNAMIC_METADATA(llmesh.edge:method)%",
    # The path the client asked for; `rpc` is where it went after stream routing and transcoding.
    "path": "%DYNAMIC_METADATA(llmesh.edge:path)%",
    "rpc": "%REQ(:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    # For REST calls Envoy derives this from the HTTP status once the transcoder has converted
    # an error; `error_code` is the status name the service actually sent.
    "grpc_status": "%GRPC_STATUS(SNAKE_STRING)%",
    "error_code": "%DYNAMIC_METADATA(llmesh.edge:error_code)%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "duration_ms": "%DURATION%",
    "upstream_ms": "%RESPONSE_DURATION%",
    # How long the request waited for the endpoint picker (ext_proc: headers and body out, its one
    # answer back; queueing and the lease included), as Envoy timed it: microseconds as a string
    # (Envoy's filter-state fields are strings); null where no picker ran.
    "picker_us": "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_header_latency_us)%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "user_agent": "%REQ(USER-AGENT)%",
}


def lua_source() -> str:
    """The edge's Lua script (stream routing, OpenAI-shaped errors), shipped with this package."""
    return (resources.files("llmesh.edge") / "lua" / "edge.lua").read_text(encoding="utf-8")


def body_fields(routes: list[HttpRoute]) -> dict[str, frozenset[str]]:
    """POST path -> the top-level JSON fields its body may carry, for every fixed path (no {variable})
    whose body is the whole request message. The transcoder drops unknown fields silently; the
    edge's Lua answers 400 naming them instead, as OpenAI does."""
    return {
        route.path: route.request_fields
        for route in routes
        if route.verb == "POST" and route.body == "*" and "{" not in route.path and route.request_fields
    }


def lua_prelude(fields: dict[str, frozenset[str]]) -> str:
    """The Lua table `BODY_FIELDS` (path -> set of field names) that edge.lua checks bodies against."""
    lines = [
        "-- Generated from the descriptor set (llmesh.edge.filters.body_fields).",
        "local BODY_FIELDS = {",
    ]
    for path in sorted(fields):
        names = ", ".join(f'["{name}"] = true' for name in sorted(fields[path]))
        lines.append(f'  ["{path}"] = {{{names}}},')
    lines.append("}")
    return "\n".join(lines) + "\n\n"


def typed(message: betterproto2.Message) -> PbAny:
    """Pack a typed config message into the `typed_config` Any Envoy expects."""
    return PbAny.pack(message)


def lua_filter() -> HttpFilter:
    """Routes `"stream": true` to the streaming RPC; refuses unknown body fields; reshapes gRPC
    errors the OpenAI way."""
    # The routes come from this package's descriptor set, as the route table's do: the rendered
    # config may name the copy a pod mounts (EdgeSettings.descriptor_path), which is not here.
    fields = body_fields(http_routes(default_descriptor_path()))
    source = lua_prelude(fields) + lua_source()
    config = Lua(default_source_code=DataSource(inline_string=source), stat_prefix="llmesh_edge")
    return HttpFilter(name="envoy.filters.http.lua", typed_config=typed(config))


def transcoder_config(settings: EdgeSettings, *, print_unset_fields: bool = True) -> GrpcJsonTranscoder:
    """REST/JSON <-> gRPC for every public service, printed the way OpenAI clients parse it.

    `print_unset_fields=False` is for token streams: OpenAI's chunks carry only what is set (no
    empty `tool_calls` per delta); fields OpenAI always prints are `optional` in the contract."""
    return GrpcJsonTranscoder(
        proto_descriptor=settings.descriptor_path,
        services=list(PUBLIC_SERVICES),
        print_options=GrpcJsonTranscoderPrintOptions(
            # Whitespace inside a JSON chunk would break SSE framing.
            add_whitespace=False,
            always_print_primitive_fields=print_unset_fields,
            preserve_proto_field_names=True,
            # Streams come out as `data: {...}\n\n` frames (text/event-stream).
            stream_sse_style_delimited=True,
        ),
        # grpc-status -> HTTP status, and a google.rpc.Status JSON body for errors.
        convert_grpc_status=True,
        request_validation_options=GrpcJsonTranscoderRequestValidationOptions(
            # A JSON request for no known method gets 404 here instead of a confusing upstream error.
            reject_unknown_method=True,
        ),
        # Extra query parameters (cache busters, SDK extras) are not worth a 400.
        ignore_unknown_query_parameters=True,
        # `GET /v1/models/org%2Fname` means the model "org/name".
        url_unescape_spec=GrpcJsonTranscoderUrlUnescapeSpec.ALL_CHARACTERS,
        max_request_body_size=settings.max_request_bytes,
        max_response_body_size=settings.max_response_bytes,
    )


def transcoder_filter(settings: EdgeSettings) -> HttpFilter:
    """The transcoder with the default print options (routes may override them)."""
    return HttpFilter(
        name="envoy.filters.http.grpc_json_transcoder", typed_config=typed(transcoder_config(settings))
    )


def router_filter() -> HttpFilter:
    """The terminal filter."""
    return HttpFilter(name="envoy.filters.http.router", typed_config=typed(Router()))


def _status_is(status: int) -> AccessLogFilter:
    return AccessLogFilter(
        status_code_filter=StatusCodeFilter(
            comparison=ComparisonFilter(
                op=ComparisonFilterOp.EQ,
                value=RuntimeUInt32(default_value=status, runtime_key=f"llmesh.local_reply.{status}"),
            )
        )
    )


def _plain_http() -> AccessLogFilter:
    # Set by the Lua filter on requests that are not native gRPC. The request's content-type
    # cannot tell: after transcoding it is application/grpc too. Native gRPC clients keep
    # Envoy's gRPC-shaped local replies (grpc-status, grpc-message), untouched.
    return AccessLogFilter(
        metadata_filter=MetadataFilter(
            matcher=MetadataMatcher(
                filter=EDGE_METADATA_NAMESPACE,
                path=[MetadataMatcherPathSegment(key="http")],
                value=ValueMatcher(bool_match=True),
            ),
            match_if_key_not_found=False,
        )
    )


def _local_reply_message(status: int, settings: EdgeSettings) -> str:
    if status == 413:
        return f"request body is larger than the limit of {settings.max_request_bytes} bytes"
    if status == 400:
        return "invalid request: %LOCAL_REPLY_BODY%"
    if status in (502, 503):
        return "service unavailable, retry shortly: %LOCAL_REPLY_BODY%"
    return "%LOCAL_REPLY_BODY%"


def local_reply_config(settings: EdgeSettings) -> LocalReplyConfig:
    """Envoy's own error replies to HTTP clients as OpenAI error JSON, status unchanged."""
    mappers = []
    for status, error_type in LOCAL_REPLY_ERROR_TYPE.items():
        body = {
            "error": {
                "message": _local_reply_message(status, settings),
                "type": error_type,
                "code": LOCAL_REPLY_CODE[status],
                "param": None,
            }
        }
        mappers.append(
            ResponseMapper(
                filter=AccessLogFilter(and_filter=AndFilter(filters=[_status_is(status), _plain_http()])),
                body_format_override=SubstitutionFormatString(json_format=Struct.from_dict(body)),
            )
        )
    return LocalReplyConfig(mappers=mappers)


def access_logs(settings: EdgeSettings) -> list[AccessLog]:
    """A JSON access log line per request, or none when the path is empty."""
    if not settings.access_log_path:
        return []
    config = FileAccessLog(
        path=settings.access_log_path,
        log_format=SubstitutionFormatString(json_format=Struct.from_dict(ACCESS_LOG_FORMAT)),
    )
    return [AccessLog(name="envoy.access_loggers.file", typed_config=typed(config))]
