"""Which gRPC methods need what: the one list of public, admin, internal and inference routes.

The edge (Envoy's ext_authz) and AuthService's own RPCs both read this module. Paths are gRPC
method paths (`/package.Service/Method`), which is what ext_authz sees after the JSON transcoder.
"""

from __future__ import annotations

import re

AUTH = "/llmesh.auth.v1.AuthService/"
MODEL = "/llmesh.model.v1.ModelService/"
REGISTRY = "/llmesh.registry.v1.RegistryService/"
SCHEDULER = "/llmesh.scheduler.v1.SchedulerService/"

# Reachable without credentials. Register is public only when auth.allow_registration is on.
PUBLIC: frozenset[str] = frozenset(
    {
        AUTH + "Login",
        AUTH + "Refresh",
        AUTH + "Logout",
        AUTH + "GetJwks",
    }
)
REGISTER = AUTH + "Register"
# Health checks and reflection of any service (prefixes).
PUBLIC_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# Only for role admin.
ADMIN: frozenset[str] = frozenset(
    {
        AUTH + "RotateSigningKey",
        AUTH + "ListUsers",
        AUTH + "UpdateUser",
        REGISTRY + "CreateModel",
        REGISTRY + "UpdateModel",
        REGISTRY + "DeleteModel",
        REGISTRY + "SetAlias",
        REGISTRY + "SetTrafficWeights",
        REGISTRY + "ImportModels",
        REGISTRY + "ExportModels",
        REGISTRY + "ListWorkers",
        REGISTRY + "DrainWorker",
        REGISTRY + "CordonWorker",
        REGISTRY + "StartModelInstance",
        REGISTRY + "StopModelInstance",
        SCHEDULER + "GetSchedulerStatus",
        SCHEDULER + "GetScalingSignals",
        SCHEDULER + "SetRoutingPolicy",
        SCHEDULER + "GetMetricsSummary",
    }
)

# Service-to-service only: never routed from the public listener, refused by Check if they are.
INTERNAL: frozenset[str] = frozenset(
    {
        AUTH + "Authenticate",
        AUTH + "Admit",
        AUTH + "RecordUsage",
        REGISTRY + "RegisterWorker",
        REGISTRY + "Heartbeat",
        REGISTRY + "DeregisterWorker",
        REGISTRY + "WatchWorkers",
        SCHEDULER + "Acquire",
        SCHEDULER + "Release",
    }
)
INTERNAL_PREFIXES: tuple[str, ...] = ("/llmesh.worker.v1.WorkerService/",)

# Inference: the body names a model (allow-list) and a token budget is reserved.
INFERENCE_CHAT: frozenset[str] = frozenset({MODEL + "CreateChatCompletion", MODEL + "StreamChatCompletion"})
INFERENCE_TEXT: frozenset[str] = frozenset({MODEL + "CreateCompletion", MODEL + "StreamCompletion"})
INFERENCE_GENERATE: frozenset[str] = frozenset({MODEL + "Generate", MODEL + "GenerateStream"})
# Embeddings: a budget for the inputs' tokens, none for output.
INFERENCE_EMBED: frozenset[str] = frozenset({MODEL + "CreateEmbeddings"})
INFERENCE = INFERENCE_CHAT | INFERENCE_TEXT | INFERENCE_GENERATE | INFERENCE_EMBED
# Name a model (allow-list) but use no generation budget.
MODEL_SCOPED: frozenset[str] = frozenset({MODEL + "Tokenize", MODEL + "Detokenize"})


# /package.Service/Method: what every request looks like after the JSON transcoder.
_GRPC_METHOD = re.compile(r"^/[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+/[A-Za-z_][A-Za-z0-9_]*$")


def is_grpc_method(method: str) -> bool:
    """Whether `method` is a gRPC method path (a REST path means the filter runs too early)."""
    return _GRPC_METHOD.match(method) is not None


def method_of(path: str) -> str:
    """The gRPC method path without a query string."""
    return path.split("?", 1)[0]


def is_public(method: str, *, allow_registration: bool) -> bool:
    return (
        method in PUBLIC or method.startswith(PUBLIC_PREFIXES) or (allow_registration and method == REGISTER)
    )


def is_internal(method: str) -> bool:
    return method in INTERNAL or method.startswith(INTERNAL_PREFIXES)


def is_admin_only(method: str) -> bool:
    return method in ADMIN
