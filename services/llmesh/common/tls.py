"""mTLS between llmesh services on one machine (`llmesh up --tls`): this process's mesh identity.

In Kubernetes the Envoy sidecars carry mTLS and the apps never see a certificate. On one machine
all processes share the loopback, so each one uses gRPC's own TLS instead: `llmesh serve` loads
its identity once (`setup_mesh_tls`, like tracing), then every server it starts requires a client
certificate signed by the mesh CA (`common.server.start_server`) and every channel it opens to a
peer presents its own certificate and accepts only the peer identity it meant to dial
(`common.channels.service_channel`). The files are what `llmesh certs` writes: per identity a
directory with `ca.crt`, `tls.crt` and `tls.key`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from llmesh.common.config import LlmeshConfig

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
        return cls(identity=identity, ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem)

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
