import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoutingPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTING_POLICY_UNSPECIFIED: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_LEAST_OUTSTANDING_TOKENS: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_PREFIX_AFFINITY: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_SESSION_AFFINITY: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_WEIGHTED_VERSIONS: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_ROUND_ROBIN: _ClassVar[RoutingPolicy]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_SUCCESS: _ClassVar[Outcome]
    OUTCOME_WORKER_FAILED: _ClassVar[Outcome]
    OUTCOME_CANCELLED: _ClassVar[Outcome]
    OUTCOME_REJECTED: _ClassVar[Outcome]
ROUTING_POLICY_UNSPECIFIED: RoutingPolicy
ROUTING_POLICY_LEAST_OUTSTANDING_TOKENS: RoutingPolicy
ROUTING_POLICY_PREFIX_AFFINITY: RoutingPolicy
ROUTING_POLICY_SESSION_AFFINITY: RoutingPolicy
ROUTING_POLICY_WEIGHTED_VERSIONS: RoutingPolicy
ROUTING_POLICY_ROUND_ROBIN: RoutingPolicy
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_NORMAL: Priority
PRIORITY_HIGH: Priority
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_SUCCESS: Outcome
OUTCOME_WORKER_FAILED: Outcome
OUTCOME_CANCELLED: Outcome
OUTCOME_REJECTED: Outcome

class AcquireRequest(_message.Message):
    __slots__ = ("request_id", "model", "tenant", "priority", "prompt_tokens", "max_tokens", "prefix_fingerprint", "session_key", "exclude_workers")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    tenant: str
    priority: Priority
    prompt_tokens: int
    max_tokens: int
    prefix_fingerprint: str
    session_key: str
    exclude_workers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., prefix_fingerprint: _Optional[str] = ..., session_key: _Optional[str] = ..., exclude_workers: _Optional[_Iterable[str]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "worker_id", "worker_address", "model", "queued_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUEUED_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    worker_id: str
    worker_address: str
    model: str
    queued_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., worker_address: _Optional[str] = ..., model: _Optional[str] = ..., queued_ms: _Optional[int] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "outcome", "prompt_tokens", "completion_tokens", "error")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    outcome: Outcome
    prompt_tokens: int
    completion_tokens: int
    error: str
    def __init__(self, lease_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class GetSchedulerStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WorkerState(_message.Message):
    __slots__ = ("worker_id", "address", "models", "active_leases", "outstanding_tokens", "capacity", "running_requests", "waiting_requests", "kv_cache_usage", "ejected", "cordoned")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    models: _containers.RepeatedScalarFieldContainer[str]
    active_leases: int
    outstanding_tokens: int
    capacity: int
    running_requests: int
    waiting_requests: int
    kv_cache_usage: float
    ejected: bool
    cordoned: bool
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., active_leases: _Optional[int] = ..., outstanding_tokens: _Optional[int] = ..., capacity: _Optional[int] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., ejected: _Optional[bool] = ..., cordoned: _Optional[bool] = ...) -> None: ...

class QueueState(_message.Message):
    __slots__ = ("model", "waiting", "active", "policy")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    model: str
    waiting: int
    active: int
    policy: RoutingPolicy
    def __init__(self, model: _Optional[str] = ..., waiting: _Optional[int] = ..., active: _Optional[int] = ..., policy: _Optional[_Union[RoutingPolicy, str]] = ...) -> None: ...

class GetSchedulerStatusResponse(_message.Message):
    __slots__ = ("workers", "queues", "leases_granted", "leases_rejected")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    LEASES_GRANTED_FIELD_NUMBER: _ClassVar[int]
    LEASES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerState]
    queues: _containers.RepeatedCompositeFieldContainer[QueueState]
    leases_granted: int
    leases_rejected: int
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerState, _Mapping]]] = ..., queues: _Optional[_Iterable[_Union[QueueState, _Mapping]]] = ..., leases_granted: _Optional[int] = ..., leases_rejected: _Optional[int] = ...) -> None: ...

class GetScalingSignalsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ScalingSignal(_message.Message):
    __slots__ = ("model", "current_replicas", "desired_replicas", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    current_replicas: int
    desired_replicas: int
    reason: str
    def __init__(self, model: _Optional[str] = ..., current_replicas: _Optional[int] = ..., desired_replicas: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class GetScalingSignalsResponse(_message.Message):
    __slots__ = ("signals",)
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    signals: _containers.RepeatedCompositeFieldContainer[ScalingSignal]
    def __init__(self, signals: _Optional[_Iterable[_Union[ScalingSignal, _Mapping]]] = ...) -> None: ...

class SetRoutingPolicyRequest(_message.Message):
    __slots__ = ("model", "policy")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: RoutingPolicy
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[_Union[RoutingPolicy, str]] = ...) -> None: ...

class SetRoutingPolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: RoutingPolicy
    def __init__(self, policy: _Optional[_Union[RoutingPolicy, str]] = ...) -> None: ...

class GetMetricsSummaryRequest(_message.Message):
    __slots__ = ("window_seconds",)
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    window_seconds: int
    def __init__(self, window_seconds: _Optional[int] = ...) -> None: ...

class LatencyPercentiles(_message.Message):
    __slots__ = ("samples", "p50_ms", "p90_ms", "p99_ms")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P90_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    samples: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    def __init__(self, samples: _Optional[int] = ..., p50_ms: _Optional[float] = ..., p90_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ...) -> None: ...

class ModelTraffic(_message.Message):
    __slots__ = ("model", "requests", "requests_by_status", "prompt_tokens", "completion_tokens", "time_to_first_token", "time_per_output_token", "waiting", "active")
    class RequestsByStatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_STATUS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIME_PER_OUTPUT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    model: str
    requests: int
    requests_by_status: _containers.ScalarMap[str, int]
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: LatencyPercentiles
    time_per_output_token: LatencyPercentiles
    waiting: int
    active: int
    def __init__(self, model: _Optional[str] = ..., requests: _Optional[int] = ..., requests_by_status: _Optional[_Mapping[str, int]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., time_to_first_token: _Optional[_Union[LatencyPercentiles, _Mapping]] = ..., time_per_output_token: _Optional[_Union[LatencyPercentiles, _Mapping]] = ..., waiting: _Optional[int] = ..., active: _Optional[int] = ...) -> None: ...

class WorkerTraffic(_message.Message):
    __slots__ = ("worker_id", "state", "models", "active_requests", "capacity", "running_requests", "waiting_requests", "kv_cache_usage")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    state: str
    models: _containers.RepeatedScalarFieldContainer[str]
    active_requests: int
    capacity: int
    running_requests: int
    waiting_requests: int
    kv_cache_usage: float
    def __init__(self, worker_id: _Optional[str] = ..., state: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., active_requests: _Optional[int] = ..., capacity: _Optional[int] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ...) -> None: ...

class GetMetricsSummaryResponse(_message.Message):
    __slots__ = ("since", "window_seconds", "requests", "requests_by_status", "prompt_tokens", "completion_tokens", "models", "workers_by_state", "workers")
    class RequestsByStatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class WorkersByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SINCE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_STATUS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    window_seconds: int
    requests: int
    requests_by_status: _containers.ScalarMap[str, int]
    prompt_tokens: int
    completion_tokens: int
    models: _containers.RepeatedCompositeFieldContainer[ModelTraffic]
    workers_by_state: _containers.ScalarMap[str, int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerTraffic]
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_seconds: _Optional[int] = ..., requests: _Optional[int] = ..., requests_by_status: _Optional[_Mapping[str, int]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelTraffic, _Mapping]]] = ..., workers_by_state: _Optional[_Mapping[str, int]] = ..., workers: _Optional[_Iterable[_Union[WorkerTraffic, _Mapping]]] = ...) -> None: ...
