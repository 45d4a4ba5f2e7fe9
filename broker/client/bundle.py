"""The trust bundle as the SDKs keep it on disk (roots, issuing CAs, token JWKS, version)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from broker._proto.broker.v1 import common_pb2
from broker.pemfile import write_atomic
from broker.protocol.e2e import verify_issuing_cas


@dataclass(frozen=True, slots=True)
class StoredBundle:
    ca_certificates_pem: str
    issuing_certificates_pem: str
    jwks_json: str
    version: str

    def issuing_cas(self) -> list[x509.Certificate]:
        """Issuing CAs of the bundle that chain to its roots (the ones a peer may be issued by)."""
        roots = x509.load_pem_x509_certificates(self.ca_certificates_pem.encode("ascii"))
        return verify_issuing_cas(self.issuing_certificates_pem, roots)


def save_bundle(path: Path, bundle: common_pb2.TrustBundle) -> None:
    """Persist a bundle received from the broker."""
    data = {
        "ca_certificates_pem": bundle.ca_certificates_pem,
        "issuing_certificates_pem": bundle.issuing_certificates_pem,
        "jwks_json": bundle.jwks_json,
        "version": bundle.version,
    }
    write_atomic(path, json.dumps(data).encode())


def load_bundle(path: Path) -> StoredBundle:
    return StoredBundle(**json.loads(path.read_text()))
