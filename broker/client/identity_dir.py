"""The on-disk identity both SDKs keep: key (0600), chain, pinned roots, trust bundle, state."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker._proto.broker.v1 import bootstrap_pb2, bootstrap_pb2_grpc, common_pb2
from broker.client.bundle import load_bundle, save_bundle
from broker.client.channels import mtls_channel, tls_channel
from broker.pemfile import read_private_key, replace_private_key, write_atomic
from broker.protocol.keys import ACCEPTED_CURVES
from broker.protocol.renewal import RenewalTranscript, sign_renewal

DEFAULT_KEY_TYPE = "P-256"
KEY_TYPES = tuple(ACCEPTED_CURVES)  # ("P-256", "P-384"): what the broker certifies


class IdentityDir:
    """A directory holding one party's identity; subclasses name their key files."""

    FILE_STEM = "identity"

    def __init__(
        self, state_dir: Path, endpoints: Any, ca_bundle_pem: bytes, *, key_type: str | None = None
    ) -> None:
        """key_type: "P-256" or "P-384" for keys made from now on; None keeps the type of the key
        already held (P-256 for a first enrollment)."""
        if key_type is not None and key_type not in ACCEPTED_CURVES:
            raise ValueError(f"key_type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")
        self.key_type = key_type
        self.dir = state_dir
        self.endpoints = endpoints
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.bundle_path.exists():
            write_atomic(self.bundle_path, ca_bundle_pem)

    @property
    def key_path(self) -> Path:
        return self.dir / f"{self.FILE_STEM}.key"

    @property
    def chain_path(self) -> Path:
        return self.dir / f"{self.FILE_STEM}.pem"

    @property
    def bundle_path(self) -> Path:
        """The pinned root certificate(s)."""
        return self.dir / "ca-bundle.pem"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def trust_path(self) -> Path:
        """The full trust bundle (JWKS included) as last received from the broker."""
        return self.dir / "trust-bundle.json"

    def new_key(self) -> ec.EllipticCurvePrivateKey:
        """A fresh ECDSA key for an enrollment or renewal (the only key types the broker certifies:
        P-256, the default, or P-384). It is generated here and never leaves this directory."""
        key_type = self.key_type or self._held_key_type() or DEFAULT_KEY_TYPE
        return ec.generate_private_key(ACCEPTED_CURVES[key_type]())

    @property
    def pending_key_path(self) -> Path:
        """The new key of a renewal after expiry not yet answered (kept so a retry asks for the
        same key: docs/PROTOCOL.md 4.5.3)."""
        return self.dir / f"{self.FILE_STEM}.pending.key"

    def pending_renewal_key(self) -> ec.EllipticCurvePrivateKey:
        """The key a renewal after expiry certifies: the one an unanswered earlier attempt sent,
        else a new one, kept on disk (0600) before it is sent."""
        if self.pending_key_path.exists():
            return read_private_key(self.pending_key_path)
        key = self.new_key()
        replace_private_key(self.pending_key_path, key)
        return key

    def _held_key_type(self) -> str | None:
        if not self.key_path.exists():
            return None
        curve = read_private_key(self.key_path).curve
        return next((name for name, cls in ACCEPTED_CURVES.items() if isinstance(curve, cls)), None)

    def save_trust_bundle(self, bundle: common_pb2.TrustBundle) -> None:
        """Keep a bundle the broker sent (enrollment, renewal, refresh or an Attach update)."""
        if bundle.ca_certificates_pem:
            write_atomic(self.bundle_path, bundle.ca_certificates_pem.encode("ascii"))
            save_bundle(self.trust_path, bundle)

    def _write_identity(
        self,
        key: ec.EllipticCurvePrivateKey,
        chain_pem: str,
        state: dict[str, Any],
        bundle: common_pb2.TrustBundle,
    ) -> None:
        # Key first (0600), then chain and bundle, then state: state.json is written last, so a
        # crash leaves a consistent identity on disk.
        replace_private_key(self.key_path, key)
        self.pending_key_path.unlink(missing_ok=True)  # held now: a later renewal starts afresh
        write_atomic(self.chain_path, chain_pem.encode("ascii"))
        self.save_trust_bundle(bundle)
        write_atomic(self.state_path, json.dumps(state).encode("utf-8"))

    async def refresh_trust_bundle(self) -> bool:
        """Fetch the broker's current trust bundle (over TLS verified with the pinned roots) and
        keep it; returns whether it differs from the one held. Apps have no Attach stream to get
        rotations pushed, so they refresh when a camera's chain does not verify; a camera whose
        handshake is refused refreshes to learn whether its root was retired."""
        async with self._bootstrap() as ch:
            response = await bootstrap_pb2_grpc.BootstrapStub(ch).GetTrustBundle(
                bootstrap_pb2.GetTrustBundleRequest(), timeout=30
            )
        bundle = response.trust_bundle
        if not bundle.ca_certificates_pem:
            return False
        held = load_bundle(self.trust_path).version if self.trust_path.exists() else ""
        if bundle.version == held:
            return False
        self.save_trust_bundle(bundle)
        return True

    async def _renew_expired(
        self, new_key: ec.EllipticCurvePrivateKey, timestamp: int
    ) -> bootstrap_pb2.RenewExpiredCertificateResponse:
        """Bootstrap.RenewExpiredCertificate for the expired certificate held here: a CSR for
        new_key, signed (with the held, expired key) over a fresh nonce and timestamp. Nothing is
        stored here; gRPC errors propagate (the caller decides what a refusal means)."""
        request = expired_renewal_request(
            read_private_key(self.key_path),
            self.chain_path.read_bytes(),
            csr_for(new_key),
            timestamp,
        )
        async with self._bootstrap() as ch:
            response: bootstrap_pb2.RenewExpiredCertificateResponse = (
                await bootstrap_pb2_grpc.BootstrapStub(ch).RenewExpiredCertificate(
                    request, timeout=30
                )
            )
        return response

    def _bootstrap(self) -> grpc.aio.Channel:
        return tls_channel(
            self.endpoints.bootstrap, self.bundle_path.read_bytes(), self.endpoints.server_name
        )

    def channel(self) -> grpc.aio.Channel:
        """Mutual TLS to the main listener with the current certificate."""
        return mtls_channel(
            self.endpoints.main,
            self.bundle_path.read_bytes(),
            self.key_path.read_bytes(),
            self.chain_path.read_bytes(),
            self.endpoints.server_name,
        )


def csr_for(key: ec.EllipticCurvePrivateKey) -> str:
    """A PEM CSR proving possession of key (the broker takes only the key from it)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def expired_renewal_request(
    held_key: ec.EllipticCurvePrivateKey,
    chain_pem: bytes,
    csr_pem: str,
    timestamp: int,
    nonce: bytes | None = None,
) -> bootstrap_pb2.RenewExpiredCertificateRequest:
    """A RenewExpiredCertificateRequest signed with the expired certificate's key over the
    renew-expired transcript (docs/PROTOCOL.md 4.5): the leaf and CSR DER, a fresh 32-byte nonce
    (unless one is given, for tests and vectors), and the timestamp."""
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    csr_der = x509.load_pem_x509_csr(csr_pem.encode("ascii")).public_bytes(
        serialization.Encoding.DER
    )
    nonce = os.urandom(32) if nonce is None else nonce
    transcript = RenewalTranscript(
        leaf.public_bytes(serialization.Encoding.DER), csr_der, nonce, timestamp
    )
    return bootstrap_pb2.RenewExpiredCertificateRequest(
        certificate_chain_pem=chain_pem.decode("ascii"),
        csr_pem=csr_pem,
        nonce=nonce,
        timestamp=timestamp,
        signature=sign_renewal(held_key, transcript),
    )
