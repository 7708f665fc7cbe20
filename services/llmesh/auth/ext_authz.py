"""Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`).

Envoy asks once per request on the public listener, after the JSON transcoder, so the path is
the gRPC method and the body is the request's gRPC frame. Allowed: identity headers for the
upstream (client-sent `x-llmesh-*` removed first) and a fresh platform request id the
reservation is keyed by. Denied: the HTTP status and an OpenAI-style error body; Check itself
never fails, so Envoy never has to guess (a bug or a dependency outage denies, fail closed).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2
from grpc import aio

from llmesh.auth import routes
from llmesh.auth.admission import Admission
from llmesh.auth.credentials import Authenticator, credential_from_headers
from llmesh.auth.metrics import count_denial
from llmesh.auth.principal import Principal
from llmesh.auth.request_body import demand_of
from llmesh.common import headers as headers_module
from llmesh.common.errors import (
    DependencyDown,
    Forbidden,
    InvalidRequest,
    LlmeshError,
    OverCapacity,
    Unauthenticated,
)

log = logging.getLogger(__name__)

# Identity headers the upstream services read. Envoy's config must not let clients set them: Check
# removes any client-sent x-llmesh-* header before setting these.
USER_HEADER = "x-llmesh-user"
KEY_ID_HEADER = "x-llmesh-key-id"
ROLE_HEADER = "x-llmesh-role"
TENANT_HEADER = "x-llmesh-tenant"
REQUEST_ID_HEADER = "x-llmesh-request-id"
IDENTITY_HEADERS = (USER_HEADER, KEY_ID_HEADER, ROLE_HEADER, TENANT_HEADER, REQUEST_ID_HEADER)
HEADER_PREFIX = "x-llmesh-"
# Set by the edge itself before Check runs (its Lua filter drops the client's copy first): the
# SSE marker that makes the worker end a REST stream with OpenAI's `data: [DONE]`.
EDGE_HEADERS = frozenset({headers_module.SSE})

# (HTTP status, google.rpc code, OpenAI error type) per domain error.
_DENIALS: list[tuple[type[LlmeshError], int, int, str]] = [
    (Unauthenticated, 401, code_pb2.UNAUTHENTICATED, "authentication_error"),
    (Forbidden, 403, code_pb2.PERMISSION_DENIED, "permission_error"),
    (OverCapacity, 429, code_pb2.RESOURCE_EXHAUSTED, "rate_limit_error"),
    (InvalidRequest, 400, code_pb2.INVALID_ARGUMENT, "invalid_request_error"),
    (DependencyDown, 503, code_pb2.UNAVAILABLE, "server_error"),
]


def error_body(message: str, error_type: str, code: str) -> str:
    """OpenAI's error JSON ({"error": {message, type, code, param}})."""
    return json.dumps({"error": {"message": message, "type": error_type, "code": code, "param": None}})


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def denied(error: LlmeshError) -> external_auth_pb2.CheckResponse:
    """The denial for a domain error: status, retry-after, OpenAI body, grpc-status for gRPC clients."""
    http, code, error_type = 500, code_pb2.INTERNAL, "server_error"
    for cls, h, c, t in _DENIALS:
        if isinstance(error, cls):
            http, code, error_type = h, c, t
            break
    code_name = code_pb2.Code.Name(code)  # type: ignore[arg-type]
    headers = [
        _header("content-type", "application/json"),
        # Native gRPC clients get the right status instead of Envoy's HTTP-to-gRPC guess
        # (which would turn 429 into UNAVAILABLE).
        _header("grpc-status", str(code)),
        _header("grpc-message", error.message.encode("ascii", "replace").decode()[:512]),
    ]
    if error.retry_after_s is not None:
        headers.append(_header("retry-after", str(max(1, round(error.retry_after_s)))))
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code, message=error.message),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http),  # type: ignore[arg-type]
            headers=headers,
            body=error_body(error.message, error_type, code_name),
        ),
    )


def allowed(
    principal: Principal | None, request_id: str, client_headers: list[str]
) -> external_auth_pb2.CheckResponse:
    """OK: our identity headers set, every other x-llmesh-* header the client sent removed.

    Envoy applies `headers` (set, overwriting a client's value) before `headers_to_remove`, so a
    name must never be in both: removal would drop the value we just set.
    """
    values = {REQUEST_ID_HEADER: request_id}
    if principal is not None:
        values.update(
            {USER_HEADER: principal.user_id, ROLE_HEADER: principal.role, TENANT_HEADER: principal.tenant}
        )
        if principal.key_id:
            values[KEY_ID_HEADER] = principal.key_id
    remove = sorted((set(client_headers) | set(IDENTITY_HEADERS)) - set(values))
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_header(k, v) for k, v in values.items()], headers_to_remove=remove
        ),
    )


def request_headers(http: attribute_context_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    """Lower-cased request headers, from `headers` or (with encode_raw_headers) `header_map`."""
    if http.header_map.headers:
        return {
            h.key.lower(): h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            for h in http.header_map.headers
        }
    return {k.lower(): v for k, v in http.headers.items()}


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Answers Envoy's ext_authz Check: authenticate, authorize the route, reserve for inference."""

    def __init__(
        self,
        authenticator: Authenticator,
        admission: Admission,
        *,
        allow_registration: bool,
        default_max_tokens: int,
        new_request_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._auth = authenticator
        self._admission = admission
        self._allow_registration = allow_registration
        self._default_max_tokens = default_max_tokens
        self._new_id = new_request_id

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        """Allow (with identity headers) or deny (with status and body) one request."""
        http = request.attributes.request.http
        method = routes.method_of(http.path)
        headers = request_headers(http)
        client_llmesh = [h for h in headers if h.startswith(HEADER_PREFIX) and h not in EDGE_HEADERS]
        request_id = self._new_id()
        try:
            principal = await self._decide(method, headers, http, request_id)
        except LlmeshError as error:
            log.info(
                "ext_authz denied",
                extra={"method": method, "error": error.message, "kind": type(error).__name__},
            )
            count_denial(error)
            return denied(error)
        except Exception:
            log.exception("bug in ext_authz Check for %s; denying", method)
            count_denial(None)
            return denied(LlmeshError(f"internal error while authorizing {method}; retry or report it"))
        return allowed(principal, request_id, client_llmesh)

    async def _decide(
        self,
        method: str,
        headers: dict[str, str],
        http: attribute_context_pb2.AttributeContext.HttpRequest,
        request_id: str,
    ) -> Principal | None:
        if not routes.is_grpc_method(method):
            # A REST path would skip the allow-list and the reservation: fail closed, loudly.
            raise LlmeshError(
                f"edge misconfiguration: ext_authz saw the HTTP path {method[:100]!r}; it must run after "
                "the gRPC-JSON transcoder (or be disabled on routes that are not gRPC)"
            )
        if routes.is_internal(method):
            raise Forbidden(f"{method} is an internal RPC and is not reachable from outside")
        if routes.is_public(method, allow_registration=self._allow_registration):
            return None
        principal = await self._auth.authenticate(credential_from_headers(headers))
        if routes.is_admin_only(method) and not principal.is_admin:
            raise Forbidden(f"{method} needs the admin role; your role is {principal.role!r}")
        if method in routes.INFERENCE or method in routes.MODEL_SCOPED:
            # raw_body with pack_as_bytes (what the edge configures); body is a lossy UTF-8 string.
            body = http.raw_body or http.body.encode()
            demand = demand_of(
                method,
                body,
                default_max_tokens=self._default_max_tokens,
                encoding=headers.get("grpc-encoding", ""),
            )
            if method in routes.INFERENCE:
                await self._admission.admit(principal, request_id, demand)
            else:
                self._admission.check_model(principal, demand.model)
        return principal
