import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from llmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATUS_UNSPECIFIED: _ClassVar[ModelStatus]
    MODEL_STATUS_REGISTERED: _ClassVar[ModelStatus]
    MODEL_STATUS_DEPLOYING: _ClassVar[ModelStatus]
    MODEL_STATUS_READY: _ClassVar[ModelStatus]
    MODEL_STATUS_DRAINING: _ClassVar[ModelStatus]
    MODEL_STATUS_RETIRED: _ClassVar[ModelStatus]

class WorkerStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATUS_UNSPECIFIED: _ClassVar[WorkerStatus]
    WORKER_STATUS_READY: _ClassVar[WorkerStatus]
    WORKER_STATUS_DRAINING: _ClassVar[WorkerStatus]
    WORKER_STATUS_CORDONED: _ClassVar[WorkerStatus]
    WORKER_STATUS_GONE: _ClassVar[WorkerStatus]
    WORKER_STATUS_FAILED: _ClassVar[WorkerStatus]

class WorkerEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_EVENT_TYPE_UNSPECIFIED: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_SNAPSHOT: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_SNAPSHOT_END: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_ADDED: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_UPDATED: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_REMOVED: _ClassVar[WorkerEventType]
MODEL_STATUS_UNSPECIFIED: ModelStatus
MODEL_STATUS_REGISTERED: ModelStatus
MODEL_STATUS_DEPLOYING: ModelStatus
MODEL_STATUS_READY: ModelStatus
MODEL_STATUS_DRAINING: ModelStatus
MODEL_STATUS_RETIRED: ModelStatus
WORKER_STATUS_UNSPECIFIED: WorkerStatus
WORKER_STATUS_READY: WorkerStatus
WORKER_STATUS_DRAINING: WorkerStatus
WORKER_STATUS_CORDONED: WorkerStatus
WORKER_STATUS_GONE: WorkerStatus
WORKER_STATUS_FAILED: WorkerStatus
WORKER_EVENT_TYPE_UNSPECIFIED: WorkerEventType
WORKER_EVENT_TYPE_SNAPSHOT: WorkerEventType
WORKER_EVENT_TYPE_SNAPSHOT_END: WorkerEventType
WORKER_EVENT_TYPE_ADDED: WorkerEventType
WORKER_EVENT_TYPE_UPDATED: WorkerEventType
WORKER_EVENT_TYPE_REMOVED: WorkerEventType

class EngineSettings(_message.Message):
    __slots__ = ("engine", "source", "dtype", "quantization", "max_model_len", "tensor_parallel_size", "max_num_seqs", "gpu_memory_utilization", "trust_remote_code", "chat_template", "upstream_model", "tool_parser")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    TRUST_REMOTE_CODE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOOL_PARSER_FIELD_NUMBER: _ClassVar[int]
    engine: str
    source: str
    dtype: str
    quantization: str
    max_model_len: int
    tensor_parallel_size: int
    max_num_seqs: int
    gpu_memory_utilization: float
    trust_remote_code: bool
    chat_template: str
    upstream_model: str
    tool_parser: str
    def __init__(self, engine: _Optional[str] = ..., source: _Optional[str] = ..., dtype: _Optional[str] = ..., quantization: _Optional[str] = ..., max_model_len: _Optional[int] = ..., tensor_parallel_size: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., gpu_memory_utilization: _Optional[float] = ..., trust_remote_code: _Optional[bool] = ..., chat_template: _Optional[str] = ..., upstream_model: _Optional[str] = ..., tool_parser: _Optional[str] = ...) -> None: ...

class ModelLimits(_message.Message):
    __slots__ = ("max_output_tokens", "max_prompt_tokens", "requests_per_minute")
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    max_output_tokens: int
    max_prompt_tokens: int
    requests_per_minute: int
    def __init__(self, max_output_tokens: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., requests_per_minute: _Optional[int] = ...) -> None: ...

class ScenarioTemplate(_message.Message):
    __slots__ = ("name", "system_prompt", "user_template")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    USER_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    system_prompt: str
    user_template: str
    def __init__(self, name: _Optional[str] = ..., system_prompt: _Optional[str] = ..., user_template: _Optional[str] = ...) -> None: ...

class DeploySettings(_message.Message):
    __slots__ = ("min_replicas", "max_replicas", "scale_up_queue_depth", "cooldown_seconds")
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SCALE_UP_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    min_replicas: int
    max_replicas: int
    scale_up_queue_depth: int
    cooldown_seconds: int
    def __init__(self, min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., scale_up_queue_depth: _Optional[int] = ..., cooldown_seconds: _Optional[int] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "version", "aliases", "description", "owned_by", "engine", "limits", "templates", "cost_per_1k_tokens", "status", "deploy", "created_at", "ready_workers", "default_sampling", "labels", "etag", "traffic_weight", "updated_at")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OWNED_BY_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    COST_PER_1K_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DEPLOY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    READY_WORKERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    description: str
    owned_by: str
    engine: EngineSettings
    limits: ModelLimits
    templates: _containers.RepeatedCompositeFieldContainer[ScenarioTemplate]
    cost_per_1k_tokens: float
    status: ModelStatus
    deploy: DeploySettings
    created_at: _timestamp_pb2.Timestamp
    ready_workers: int
    default_sampling: _common_pb2.SamplingParams
    labels: _containers.ScalarMap[str, str]
    etag: str
    traffic_weight: int
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., owned_by: _Optional[str] = ..., engine: _Optional[_Union[EngineSettings, _Mapping]] = ..., limits: _Optional[_Union[ModelLimits, _Mapping]] = ..., templates: _Optional[_Iterable[_Union[ScenarioTemplate, _Mapping]]] = ..., cost_per_1k_tokens: _Optional[float] = ..., status: _Optional[_Union[ModelStatus, str]] = ..., deploy: _Optional[_Union[DeploySettings, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ready_workers: _Optional[int] = ..., default_sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., etag: _Optional[str] = ..., traffic_weight: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("only_ready", "include_retired")
    ONLY_READY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RETIRED_FIELD_NUMBER: _ClassVar[int]
    only_ready: bool
    include_retired: bool
    def __init__(self, only_ready: _Optional[bool] = ..., include_retired: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class UpdateModelRequest(_message.Message):
    __slots__ = ("model", "update_mask", "etag")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    model: Model
    update_mask: _containers.RepeatedScalarFieldContainer[str]
    etag: str
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., update_mask: _Optional[_Iterable[str]] = ..., etag: _Optional[str] = ...) -> None: ...

class UpdateModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name", "version", "etag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    etag: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("alias", "model")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    alias: str
    model: str
    def __init__(self, alias: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class SetAliasResponse(_message.Message):
    __slots__ = ("alias", "model")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    alias: str
    model: str
    def __init__(self, alias: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class SetTrafficWeightsRequest(_message.Message):
    __slots__ = ("name", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weights: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., weights: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SetTrafficWeightsResponse(_message.Message):
    __slots__ = ("weights",)
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.ScalarMap[str, int]
    def __init__(self, weights: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ImportModelsRequest(_message.Message):
    __slots__ = ("yaml", "replace")
    YAML_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    replace: bool
    def __init__(self, yaml: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class ImportModelsResponse(_message.Message):
    __slots__ = ("imported", "created", "updated", "unchanged")
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    imported: _containers.RepeatedScalarFieldContainer[str]
    created: _containers.RepeatedScalarFieldContainer[str]
    updated: _containers.RepeatedScalarFieldContainer[str]
    unchanged: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, imported: _Optional[_Iterable[str]] = ..., created: _Optional[_Iterable[str]] = ..., updated: _Optional[_Iterable[str]] = ..., unchanged: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportModelsRequest(_message.Message):
    __slots__ = ("include_retired",)
    INCLUDE_RETIRED_FIELD_NUMBER: _ClassVar[int]
    include_retired: bool
    def __init__(self, include_retired: _Optional[bool] = ...) -> None: ...

class ExportModelsResponse(_message.Message):
    __slots__ = ("yaml",)
    YAML_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    def __init__(self, yaml: _Optional[str] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("worker_id", "address", "models", "engine", "capacity", "labels", "status", "load", "last_heartbeat", "registered_at", "model_versions")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ModelVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    models: _containers.RepeatedScalarFieldContainer[str]
    engine: str
    capacity: int
    labels: _containers.ScalarMap[str, str]
    status: WorkerStatus
    load: _common_pb2.WorkerLoad
    last_heartbeat: _timestamp_pb2.Timestamp
    registered_at: _timestamp_pb2.Timestamp
    model_versions: _containers.ScalarMap[str, str]
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., engine: _Optional[str] = ..., capacity: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., status: _Optional[_Union[WorkerStatus, str]] = ..., load: _Optional[_Union[_common_pb2.WorkerLoad, _Mapping]] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: Worker
    def __init__(self, worker: _Optional[_Union[Worker, _Mapping]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("lease_ttl_seconds", "heartbeat_interval_seconds")
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_ttl_seconds: int
    heartbeat_interval_seconds: int
    def __init__(self, lease_ttl_seconds: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "load", "status")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    load: _common_pb2.WorkerLoad
    status: WorkerStatus
    def __init__(self, worker_id: _Optional[str] = ..., load: _Optional[_Union[_common_pb2.WorkerLoad, _Mapping]] = ..., status: _Optional[_Union[WorkerStatus, str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "status")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    status: WorkerStatus
    def __init__(self, known: _Optional[bool] = ..., status: _Optional[_Union[WorkerStatus, str]] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    def __init__(self, workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: Worker
    def __init__(self, worker: _Optional[_Union[Worker, _Mapping]] = ...) -> None: ...

class CordonWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "cordoned")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    cordoned: bool
    def __init__(self, worker_id: _Optional[str] = ..., cordoned: _Optional[bool] = ...) -> None: ...

class CordonWorkerResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: Worker
    def __init__(self, worker: _Optional[_Union[Worker, _Mapping]] = ...) -> None: ...

class WatchWorkersRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WatchWorkersResponse(_message.Message):
    __slots__ = ("type", "worker")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    type: WorkerEventType
    worker: Worker
    def __init__(self, type: _Optional[_Union[WorkerEventType, str]] = ..., worker: _Optional[_Union[Worker, _Mapping]] = ...) -> None: ...

class StartModelInstanceRequest(_message.Message):
    __slots__ = ("model", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartModelInstanceResponse(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class StopModelInstanceRequest(_message.Message):
    __slots__ = ("model", "worker_id", "drain_timeout_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker_id: str
    drain_timeout_seconds: int
    def __init__(self, model: _Optional[str] = ..., worker_id: _Optional[str] = ..., drain_timeout_seconds: _Optional[int] = ...) -> None: ...

class StopModelInstanceResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: Worker
    def __init__(self, worker: _Optional[_Union[Worker, _Mapping]] = ...) -> None: ...

class TrafficSplit(_message.Message):
    __slots__ = ("model", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: _containers.ScalarMap[str, int]
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListTrafficWeightsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListTrafficWeightsResponse(_message.Message):
    __slots__ = ("splits",)
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    splits: _containers.RepeatedCompositeFieldContainer[TrafficSplit]
    def __init__(self, splits: _Optional[_Iterable[_Union[TrafficSplit, _Mapping]]] = ...) -> None: ...

class WatchTrafficWeightsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchTrafficWeightsResponse(_message.Message):
    __slots__ = ("snapshot", "splits")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    snapshot: bool
    splits: _containers.RepeatedCompositeFieldContainer[TrafficSplit]
    def __init__(self, snapshot: _Optional[bool] = ..., splits: _Optional[_Iterable[_Union[TrafficSplit, _Mapping]]] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("model", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    limit: int
    def __init__(self, model: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("id", "at", "actor", "action", "model", "version", "before_json", "after_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BEFORE_JSON_FIELD_NUMBER: _ClassVar[int]
    AFTER_JSON_FIELD_NUMBER: _ClassVar[int]
    id: int
    at: _timestamp_pb2.Timestamp
    actor: str
    action: str
    model: str
    version: str
    before_json: str
    after_json: str
    def __init__(self, id: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., before_json: _Optional[str] = ..., after_json: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ...) -> None: ...
