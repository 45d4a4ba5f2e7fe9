"""The on-disk identity both SDKs keep: key (0600), chain, pinned roots, trust bundle, state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from broker._proto.broker.v1 import common_pb2
from broker.client.bundle import save_bundle
from broker.client.channels import mtls_channel, tls_channel
from broker.pki.pemfile import replace_private_key, write_atomic


class IdentityDir:
    """A directory holding one party's identity; subclasses name their key files."""

    FILE_STEM = "identity"

    def __init__(self, state_dir: Path, endpoints: Any, ca_bundle_pem: bytes) -> None:
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
        write_atomic(self.chain_path, chain_pem.encode("ascii"))
        self.save_trust_bundle(bundle)
        write_atomic(self.state_path, json.dumps(state).encode("utf-8"))

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
