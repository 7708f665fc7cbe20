"""mTLS between llmesh services on one machine (`llmesh up --tls`): this process's mesh identity.

In Kubernetes the Envoy sidecars carry mTLS and the apps never see a certificate. On one machine
all processes share the loopback, so each one uses gRPC's own TLS instead: `llmesh serve` loads
its identity once (`setup_mesh_tls`, like tracing), then every server it starts requires a client
certificate signed by the mesh CA (`common.server.start_server`) and every channel it opens to a
peer presents its own certificate and accepts only the peer identity it meant to dial
(`common.channels.service_channel`); its servers also admit only the identities that the mesh's
call graph lets call it (`CALLERS`, checked per RPC from the caller's SPIFFE ID). The files are what
`llmesh certs` writes: per identity a directory with `ca.crt`, `tls.crt` and `tls.key`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from llmesh.common.config import LlmeshConfig
from llmesh.common.handlers import HANDLER_MAKERS, with_behavior

log = logging.getLogger(__name__)

# The certificate identity of each `llmesh serve` service (names of `llmesh certs`' identities;
# every worker shares one, as their pods share one Secret in Kubernetes).
SERVICE_IDENTITY: dict[str, str] = {
    "registry": "registry",
    "scheduler": "scheduler",
    "auth": "auth",
    "worker": "workers",
}
EDGE_IDENTITY = "edge"
TRUST_DOMAIN = "llmesh"
# Who may call each identity's servers: the mesh's call graph, as the Kubernetes sidecars enforce it
# (llmesh.edge.sidecar.MESH; a test checks they agree). The edge reaches every service.
CALLERS: dict[str, frozenset[str]] = {
    "registry": frozenset({EDGE_IDENTITY, "scheduler", "workers"}),
    "scheduler": frozenset({EDGE_IDENTITY, "workers"}),
    "auth": frozenset({EDGE_IDENTITY, "scheduler"}),
    "workers": frozenset({EDGE_IDENTITY}),
}
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"


class MeshTlsError(ValueError):
    """The mesh's certificates are missing or unreadable; the message says how to make them."""


@dataclass(frozen=True)
class MeshIdentity:
    """One identity's certificate and key, and the CA every peer's certificate must chain to."""

    identity: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    # Identities admitted to our servers; empty: any certificate the CA signed.
    callers: frozenset[str] = frozenset()

    @classmethod
    def load(cls, tls_dir: Path, identity: str) -> MeshIdentity:
        """Read `tls_dir/<identity>/{ca.crt,tls.crt,tls.key}`."""
        folder = tls_dir / identity
        try:
            files = [(folder / name).read_bytes() for name in (CA_FILE, CERT_FILE, KEY_FILE)]
        except OSError as error:
            raise MeshTlsError(
                f"mesh TLS: cannot read {error.filename}: {error.strerror}; make the certificates with "
                f"`llmesh certs --out {tls_dir}` (`llmesh up --tls` does)"
            ) from None
        ca_pem, cert_pem, key_pem = files
        return cls(
            identity=identity,
            ca_pem=ca_pem,
            cert_pem=cert_pem,
            key_pem=key_pem,
            callers=CALLERS.get(identity, frozenset()),
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with our certificate; callers must present one signed by the mesh CA."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Dial with our certificate; the server's must be signed by the mesh CA."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )


_identity: MeshIdentity | None = None


def use_mesh_identity(identity: MeshIdentity | None) -> None:
    """Serve and dial as `identity` from now on (None: plaintext, the default)."""
    global _identity
    _identity = identity


def mesh_identity() -> MeshIdentity | None:
    """This process's mesh identity, or None when mesh TLS is off."""
    return _identity


def mesh_tls_dir(cfg: LlmeshConfig, data_dir: Path) -> Path:
    """Where the mesh's certificates are: `tls.dir`, else `<data-dir>/tls`."""
    return Path(cfg.tls.dir) if cfg.tls.dir else data_dir / "tls"


def setup_mesh_tls(cfg: LlmeshConfig, service: str, data_dir: Path) -> MeshIdentity | None:
    """Load `service`'s identity when `tls.enabled` and make it this process's (once, in main)."""
    if not cfg.tls.enabled:
        return None
    identity = MeshIdentity.load(mesh_tls_dir(cfg, data_dir), SERVICE_IDENTITY[service])
    use_mesh_identity(identity)
    log.info("mesh TLS on", extra={"identity": identity.identity})
    return identity


def spiffe_id(identity: str) -> str:
    """The URI SAN `llmesh certs` gives `identity`, which peers check: gRPC reports it as the
    caller's SPIFFE ID, Envoy matches it (namespace-free, so rendered configs hold anywhere)."""
    return f"spiffe://{TRUST_DOMAIN}/{identity}"


class CallerCheckInterceptor(aio.ServerInterceptor):
    """Refuses (PERMISSION_DENIED) every RPC whose caller's certificate names no identity in
    `callers`: the CA proves who the caller is, this decides whether it may call us."""

    def __init__(self, service: str, callers: frozenset[str]) -> None:
        self._service = service
        self._allowed = {spiffe_id(caller) for caller in callers}
        self._callers = sorted(callers)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        for kind in HANDLER_MAKERS:
            behavior = getattr(handler, kind)
            if behavior is not None:
                return with_behavior(handler, kind, self._guard(behavior))
        return handler

    async def _check(self, context: aio.ServicerContext) -> None:
        presented = [v.decode() for v in context.auth_context().get("peer_spiffe_id", [])]
        if not self._allowed.intersection(presented):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{self._service} admits mesh identities {self._callers}; the caller's certificate "
                f"names {presented or 'no SPIFFE ID'}",
            )

    def _guard(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        check = self._check
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                await check(context)
                # aclosing: a cancelled RPC closes the inner stream now, not at garbage collection.
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

            return stream

        async def call(request: Any, context: aio.ServicerContext) -> Any:
            await check(context)
            return await behavior(request, context)

        return call


def caller_check_interceptors(service: str) -> list[aio.ServerInterceptor]:
    """The caller check for a server of this process, when mesh TLS is on and it names callers."""
    identity = _identity
    if identity is None or not identity.callers:
        return []
    return [CallerCheckInterceptor(service, identity.callers)]
