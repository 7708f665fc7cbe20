"""The edge's token path: the workers cluster, the endpoint picker filter and the inference routes.

Envoy streams from the worker directly. For every inference request the endpoint picker
(SchedulerService's ext_proc) reads the request and answers with `x-llmesh-destinations`: the
leased worker, then fallbacks. The workers cluster's override_host policy sends the request to the
first of those and each retry to the next, among the hosts the scheduler publishes over EDS.

Why override_host and not an ORIGINAL_DST cluster fed by a header: ORIGINAL_DST connects to the one
address the header names, so a retry would hit the same failed worker; override_host takes a list
and moves along it on retries, and its hosts are real cluster members (health, outlier detection,
per-host stats). Both validate and run in Envoy 1.40.
"""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCommonLbConfig,
    ClusterDiscoveryType,
    ClusterEdsClusterConfig,
    LoadBalancingPolicy,
    LoadBalancingPolicyPolicy,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.core.v3 import (
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    ConfigSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Http2ProtocolOptions,
    HttpProtocolOptions,
    KeepaliveSettings,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.route.v3 import (
    RetryPolicy,
    Route,
    RouteAction,
    RouteActionMaxStreamDuration,
    RouteMatch,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcPerRoute,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
from envoy_data_plane.envoy.extensions.load_balancing_policies.override_host.v3 import (
    OverrideHost,
    OverrideHostOverrideHostSource,
)
from envoy_data_plane.envoy.extensions.load_balancing_policies.round_robin.v3 import RoundRobin
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import HttpProtocolOptions as UpstreamHttpOptions
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import HttpProtocolOptionsExplicitHttpConfig
from envoy_data_plane.envoy.type.v3 import HttpStatus, Percent, StatusCode
from envoy_data_plane.google.protobuf import Any as PbAny

from llmesh.edge.filters import typed
from llmesh.edge.settings import MODEL_SERVICE, EdgeSettings

WORKERS_CLUSTER = "llmesh_workers"  # also the EDS service name the scheduler answers for
PICKER_CLUSTER = "scheduler"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
# Written by the picker: the leased worker then fallbacks, "ip:port,ip:port".
DESTINATIONS_HEADER = "x-llmesh-destinations"
# ModelService's RPCs the workers serve (the rest of ModelService is the registry's catalog).
INFERENCE_METHODS: tuple[str, ...] = (
    "CreateChatCompletion",
    "StreamChatCompletion",
    "CreateCompletion",
    "StreamCompletion",
    "CreateEmbeddings",
    "Tokenize",
    "Detokenize",
)
UPSTREAM_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
MAX_UPSTREAM_REQUESTS = 100_000


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def inference_paths() -> list[str]:
    """The gRPC paths of the RPCs routed to workers through the picker."""
    return [f"/{MODEL_SERVICE}/{method}" for method in INFERENCE_METHODS]


def http2_upstream_options() -> UpstreamHttpOptions:
    """HTTP/2 to an upstream, with keepalive so a dead connection under a long stream is noticed."""
    return UpstreamHttpOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions(
                connection_keepalive=KeepaliveSettings(interval=_seconds(30), timeout=_seconds(10)),
            )
        ),
        common_http_protocol_options=HttpProtocolOptions(idle_timeout=_seconds(3600)),
    )


def picker_processing_mode() -> ProcessingMode:
    """Request headers and body in (the destination header out), response trailers in (usage,
    outcome); response headers and body — the tokens — never go to the picker.

    The body is STREAMED, not BUFFERED, only so that Envoy can send it right behind the headers
    (`send_body_without_waiting_for_header_response` works in STREAMED mode alone): the picker
    holds its answer to the headers until the body is complete, then answers once, handing the body
    back with it (CONTINUE_AND_REPLACE), so choosing a worker costs one round trip to the picker
    instead of two."""
    return ProcessingMode(
        request_header_mode=ProcessingModeHeaderSendMode.SEND,
        request_body_mode=ProcessingModeBodySendMode.STREAMED,
        request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
        response_header_mode=ProcessingModeHeaderSendMode.SKIP,
        response_body_mode=ProcessingModeBodySendMode.NONE,
        response_trailer_mode=ProcessingModeHeaderSendMode.SEND,
    )


def picker_filter(settings: EdgeSettings) -> HttpFilter:
    """ext_proc to the scheduler: request headers and the whole body in, the destination header
    out; the response's trailers (usage) at the end. Token chunks never go to the picker.
    Control-plane routes turn it off (`picker_off`)."""
    config = ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=PICKER_CLUSTER)),
        # No picker, no routing: fail closed (503) rather than send requests anywhere. Envoy's
        # default status for a failed ext_proc stream is 500 (INTERNAL, a bug); the picker being
        # down or unreachable is a dependency down (503, UNAVAILABLE for gRPC clients).
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        processing_mode=picker_processing_mode(),
        send_body_without_waiting_for_header_response=True,
        message_timeout=_seconds(settings.picker_timeout_s),
        stat_prefix="llmesh_picker",
    )
    return HttpFilter(name=EXT_PROC_FILTER, typed_config=typed(config))


def picker_off() -> dict[str, PbAny]:
    """Per-route config that keeps the picker out of a route (control-plane RPCs).

    The filter is on by default and turned off per route, not the other way round: Envoy decides
    whether a disabled-by-default filter runs from the route the request matched on arrival, and
    a REST request matches its route only after the transcoder rewrote it to the gRPC path."""
    return {EXT_PROC_FILTER: typed(ExtProcPerRoute(disabled=True))}


def _retry_policy(settings: EdgeSettings) -> RetryPolicy:
    # Only failures before the worker's first byte are retried (Envoy never retries once response
    # headers went downstream; a gRPC worker sends them with its first token): a reset or refused
    # connection, or UNAVAILABLE as a trailers-only answer (a draining worker). A busy worker's
    # RESOURCE_EXHAUSTED goes back to the client (429) and is not retried here.
    return RetryPolicy(
        retry_on="reset,connect-failure,refused-stream,unavailable",
        num_retries=settings.worker_retries,
    )


def inference_routes(settings: EdgeSettings) -> list[Route]:
    """Exact-path routes for the inference RPCs, to the workers cluster with the picker enabled."""
    return [
        Route(
            name=f"workers:{path}",
            match=RouteMatch(path=path),
            route=RouteAction(
                cluster=WORKERS_CLUSTER,
                timeout=timedelta(0),
                max_stream_duration=RouteActionMaxStreamDuration(grpc_timeout_header_max=timedelta(0)),
                retry_policy=_retry_policy(settings),
            ),
        )
        for path in inference_paths()
    ]


def workers_cluster(settings: EdgeSettings) -> Cluster:
    """Workers as the scheduler publishes them (EDS), picked per request by override_host."""
    eds_source = ConfigSource(
        api_config_source=ApiConfigSource(
            api_type=ApiConfigSourceApiType.GRPC,
            transport_api_version=ApiVersion.V3,
            grpc_services=[GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=PICKER_CLUSTER))],
            set_node_on_first_message_only=True,
        ),
        resource_api_version=ApiVersion.V3,
        initial_fetch_timeout=_seconds(settings.workers_initial_fetch_timeout_s),
    )
    override = OverrideHost(
        override_host_sources=[OverrideHostOverrideHostSource(header=DESTINATIONS_HEADER)],
        fallback_policy=LoadBalancingPolicy(
            policies=[
                LoadBalancingPolicyPolicy(
                    typed_extension_config=TypedExtensionConfig(
                        name="envoy.load_balancing_policies.round_robin", typed_config=typed(RoundRobin())
                    )
                )
            ]
        ),
    )
    return Cluster(
        name=WORKERS_CLUSTER,
        type=ClusterDiscoveryType.EDS,
        eds_cluster_config=ClusterEdsClusterConfig(eds_config=eds_source, service_name=WORKERS_CLUSTER),
        connect_timeout=_seconds(settings.connect_timeout_s),
        load_balancing_policy=LoadBalancingPolicy(
            policies=[
                LoadBalancingPolicyPolicy(
                    typed_extension_config=TypedExtensionConfig(
                        name="envoy.load_balancing_policies.override_host", typed_config=typed(override)
                    )
                )
            ]
        ),
        typed_extension_protocol_options={UPSTREAM_OPTIONS_KEY: typed(http2_upstream_options())},
        # Gateway failures (502/503/504: UNAVAILABLE, resets), 5xx (Envoy's default: 5 in a row)
        # and connect failures count; a busy worker's RESOURCE_EXHAUSTED (429) and 4xx do not.
        outlier_detection=OutlierDetection(
            consecutive_gateway_failure=settings.worker_eject_after_failures,
            enforcing_consecutive_gateway_failure=100,
            split_external_local_origin_errors=True,
            consecutive_local_origin_failure=settings.worker_eject_after_failures,
            enforcing_consecutive_local_origin_failure=100,
            interval=_seconds(1),
            base_ejection_time=_seconds(settings.worker_eject_seconds),
            max_ejection_percent=100,
        ),
        # No panic routing: with every worker ejected the client gets a clean 503.
        common_lb_config=ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0.0)),
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    max_connections=MAX_UPSTREAM_REQUESTS,
                    max_pending_requests=MAX_UPSTREAM_REQUESTS,
                    max_requests=MAX_UPSTREAM_REQUESTS,
                    max_retries=MAX_UPSTREAM_REQUESTS,
                )
            ]
        ),
        per_connection_buffer_limit_bytes=settings.max_request_bytes,
    )
