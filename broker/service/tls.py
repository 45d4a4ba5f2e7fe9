"""Server TLS credentials that follow certs/ on disk, so rotations need no restart.

grpcio calls the fetcher on every new handshake; it returns a new configuration only when the
files changed and the key matches the certificate (a half-written rotation is never served).
Existing connections keep the credentials they were established with.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("broker.tls")


def key_matches_chain(key_pem: bytes, chain_pem: bytes) -> bool:
    """Whether the private key belongs to the chain's leaf certificate."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        leaf = x509.load_pem_x509_certificate(chain_pem)
    except (ValueError, TypeError):
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) == leaf.public_key().public_bytes(serialization.Encoding.DER, spki)


class ReloadingCredentials:
    """Dynamic server credentials for one listener."""

    def __init__(self, key_path: Path, chain_path: Path, client_ca_path: Path | None) -> None:
        self._key_path = key_path
        self._chain_path = chain_path
        self._client_ca_path = client_ca_path
        self._digest = ""
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        self.reloads = 0

    def _paths(self) -> tuple[Path, ...]:
        return tuple(p for p in (self._key_path, self._chain_path, self._client_ca_path) if p)

    def _file_stamp(self) -> tuple[tuple[int, int, int], ...]:
        """(inode, mtime, size) of each file: rotations replace files atomically, so a changed
        file always changes its stamp, and an unchanged stamp needs no read at all."""
        stats = (p.stat() for p in self._paths())
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        client_ca = self._client_ca_path.read_bytes() if self._client_ca_path else None
        return self._key_path.read_bytes(), self._chain_path.read_bytes(), client_ca

    def _configuration(
        self, key: bytes, chain: bytes, client_ca: bytes | None
    ) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(key, chain)], root_certificates=client_ca
        )

    def credentials(self) -> grpc.ServerCredentials:
        self._stamp = self._file_stamp()
        key, chain, client_ca = self._read()
        self._digest = self._fingerprint(key, chain, client_ca)
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(key, chain, client_ca),
            self._fetch,
            require_client_authentication=self._client_ca_path is not None,
        )

    @staticmethod
    def _fingerprint(key: bytes, chain: bytes, client_ca: bytes | None) -> str:
        return hashlib.sha256(key + b"\0" + chain + b"\0" + (client_ca or b"")).hexdigest()

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc on every handshake, holding the GIL: stat, and read only on change.
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return None
            key, chain, client_ca = self._read()
        except OSError:
            return None
        self._stamp = stamp
        digest = self._fingerprint(key, chain, client_ca)
        if digest == self._digest or not key_matches_chain(key, chain):
            return None
        self._digest = digest
        self.reloads += 1
        log.info("tls credentials reloaded from %s", self._chain_path)
        return self._configuration(key, chain, client_ca)
