"""The trust bundle parties pin: root CA(s), issuing CA(s), token-signing keys, and its version."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from broker.config import Config
from broker.errors import ConfigurationError
from broker.pki.ca import PkiFiles


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """What a device or app needs to verify the broker and its peers."""

    ca_certificates_pem: str
    issuing_certificates_pem: str
    jwks_json: str
    version: str


def bundle_version(ca_pem: str, issuing_pem: str, jwks_json: str) -> str:
    """Content-derived version: any change to the bundle changes it."""
    digest = hashlib.sha256("\x00".join((ca_pem, issuing_pem, jwks_json)).encode("utf-8"))
    return digest.hexdigest()[:16]


def load_trust_bundle(config: Config, jwks_json: str = "") -> TrustBundle:
    """Read the bundle from ``certs/`` (ca-bundle.pem and the issuing CA certificate)."""
    files = PkiFiles(config.certs_dir)
    if not files.ca_bundle.exists() or not files.issuing_cert.exists():
        raise ConfigurationError(f"no PKI in {files.root}: run `broker ca init` (make certs)")
    from broker.pki.rotation import issuing_bundle_pem

    ca_pem = files.ca_bundle.read_text()
    issuing_pem = issuing_bundle_pem(files)
    return TrustBundle(
        ca_pem, issuing_pem, jwks_json, bundle_version(ca_pem, issuing_pem, jwks_json)
    )
