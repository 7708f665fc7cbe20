"""`llmesh certs`: a local CA and one certificate per mesh identity, for Envoy's mTLS between pods.

Every identity (registry, scheduler, auth, workers, edge) gets a key pair and a certificate signed
by the CA, carrying the URI SAN `spiffe://llmesh/<identity>` that peers check, DNS SANs for the
Service names, and both serverAuth and clientAuth usages (a sidecar is both). The output is the
layout cert-manager writes, so either can fill the Secrets the manifests mount:

    llmesh certs --out .llmesh/tls                     # ca.crt, ca.key, <identity>/{ca.crt,tls.crt,tls.key}
    llmesh certs --out .llmesh/tls --secrets k8s-mtls.yaml --namespace llmesh
    kubectl apply -f k8s-mtls.yaml                     # Secrets llmesh-mtls-<identity>

An existing CA in --out is reused (new leaf certificates, same trust), so re-running rotates the
leaves without breaking pods that still hold the old ones.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from llmesh.common.tls import spiffe_id

IDENTITIES: tuple[str, ...] = ("registry", "scheduler", "auth", "workers", "edge")
SECRET_PREFIX = "llmesh-mtls-"
CA_DAYS = 3650
LEAF_DAYS = 365


@dataclass(frozen=True)
class Issued:
    """One identity's PEM files."""

    identity: str
    cert_pem: bytes
    key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str = "llmesh mesh CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA (P-256) allowed to sign leaf certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def dns_names(identity: str, namespace: str) -> list[str]:
    """The names a peer may dial `identity` by inside the cluster (and on one machine)."""
    names = [identity, f"{identity}.{namespace}", f"{identity}.{namespace}.svc"]
    return [*names, f"{identity}.{namespace}.svc.cluster.local", "localhost"]


def issue(
    identity: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    namespace: str = "llmesh",
    days: int = LEAF_DAYS,
) -> Issued:
    """A leaf certificate for `identity`, for serving and for dialing peers."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(identity))]
    sans += [x509.DNSName(name) for name in dns_names(identity, namespace)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(identity, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Keys are created owner-only from the start, never world-readable for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)


def load_or_make_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA in `out` (ca.key, ca.crt) when there is one, else a new one written there."""
    key_path, cert_path = out / "ca.key", out / "ca.crt"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: expected an EC private key")
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key, cert = make_ca()
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def write_bundle(
    out: Path, identities: Sequence[str] = IDENTITIES, *, namespace: str = "llmesh"
) -> dict[str, Issued]:
    """CA (reused when present) and a leaf per identity under `out/<identity>/` as ca.crt,
    tls.crt, tls.key — the files a pod's Secret volume holds."""
    ca_key, ca_cert = load_or_make_ca(out)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    issued = {}
    for identity in identities:
        leaf = issue(identity, ca_key, ca_cert, namespace=namespace)
        _write(out / identity / "ca.crt", ca_pem)
        _write(out / identity / "tls.crt", leaf.cert_pem)
        _write(out / identity / "tls.key", leaf.key_pem, private=True)
        issued[identity] = leaf
    return issued


def secret_manifests(out: Path, identities: Sequence[str], namespace: str) -> str:
    """One `kubernetes.io/tls` Secret per identity (plus ca.crt), as a multi-document YAML."""
    docs = []
    for identity in identities:
        data = {
            name: base64.b64encode((out / identity / name).read_bytes()).decode()
            for name in ("ca.crt", "tls.crt", "tls.key")
        }
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "kubernetes.io/tls",
                "metadata": {
                    "name": f"{SECRET_PREFIX}{identity}",
                    "namespace": namespace,
                    "labels": {"app.kubernetes.io/part-of": "llmesh", "llmesh.dev/mtls-identity": identity},
                },
                "data": data,
            }
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `llmesh certs`."""
    parser.add_argument("--out", type=Path, required=True, help="directory for the CA and the certificates")
    parser.add_argument(
        "--identities",
        default=",".join(IDENTITIES),
        help=f"comma-separated identities (default: {','.join(IDENTITIES)})",
    )
    parser.add_argument("--namespace", default="llmesh", help="Kubernetes namespace (DNS SANs, Secrets)")
    parser.add_argument(
        "--secrets", type=Path, help="also write Secret manifests llmesh-mtls-<identity> to this file"
    )


def certs_main(args: argparse.Namespace) -> int:
    """Write the CA and certificates (and Secret manifests when asked)."""
    identities = [name.strip() for name in args.identities.split(",") if name.strip()]
    if not identities:
        print("llmesh certs: --identities is empty", file=sys.stderr)
        return 2
    write_bundle(args.out, identities, namespace=args.namespace)
    print(f"wrote CA and certificates for {', '.join(identities)} under {args.out}", file=sys.stderr)
    if args.secrets is not None:
        _write(args.secrets, secret_manifests(args.out, identities, args.namespace).encode(), private=True)
        print(f"wrote Secret manifests to {args.secrets} (kubectl apply -f {args.secrets})", file=sys.stderr)
    return 0
