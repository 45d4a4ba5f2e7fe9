"""Device SDK: what camera firmware does to get and keep its identity.

The key is generated on the device and never leaves it; the identity lives in a directory
(``device.key`` 0600, ``device.pem`` chain, ``ca-bundle.pem``, ``state.json``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker._proto.broker.v1 import (
    bootstrap_pb2,
    bootstrap_pb2_grpc,
    common_pb2,
    device_pb2,
    device_pb2_grpc,
)
from broker.client.channels import mtls_channel, tls_channel
from broker.clock import Clock, SystemClock
from broker.pemfile import write_atomic
from broker.tokens import SessionClaims, TokenVerifier


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the device remembers about its identity between boots."""

    device_id: str
    spiffe_id: str
    not_after: int
    renew_after: int
    trust_bundle_version: str
    claim_code: str = ""


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the broker listens, and the name its certificate carries."""

    bootstrap: str
    main: str
    factory: str = ""
    server_name: str | None = None


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    """A CSR proving possession of key. The broker ignores everything in it but the key."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class DeviceClient:
    """A camera's view of the broker: enroll, renew, attach."""

    def __init__(self, state_dir: Path, endpoints: Endpoints, ca_bundle_pem: bytes) -> None:
        self.dir = state_dir
        self.endpoints = endpoints
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.bundle_path.exists():
            write_atomic(self.bundle_path, ca_bundle_pem)

    # -- files ---------------------------------------------------------------------------------
    @property
    def key_path(self) -> Path:
        return self.dir / "device.key"

    @property
    def chain_path(self) -> Path:
        return self.dir / "device.pem"

    @property
    def bundle_path(self) -> Path:
        return self.dir / "ca-bundle.pem"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def trust_path(self) -> Path:
        """The full trust bundle (JWKS included) as last received from the broker."""
        return self.dir / "trust-bundle.json"

    def save_trust_bundle(self, bundle: common_pb2.TrustBundle) -> None:
        """Keep the bundle the broker sent (enrollment, renewal or an Attach update)."""
        data = {
            "ca_certificates_pem": bundle.ca_certificates_pem,
            "issuing_certificates_pem": bundle.issuing_certificates_pem,
            "jwks_json": bundle.jwks_json,
            "version": bundle.version,
        }
        write_atomic(self.trust_path, json.dumps(data).encode())

    def token_verifier(self, clock: Clock | None = None) -> DeviceTokenVerifier:
        """The camera's own check of session tokens, against its own trust bundle and identity."""
        bundle = json.loads(self.trust_path.read_text())
        state = self.state
        trust_domain = state.spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        return DeviceTokenVerifier(
            TokenVerifier(
                bundle["jwks_json"], f"spiffe://{trust_domain}/broker", clock or SystemClock()
            ),
            state.spiffe_id,
        )

    @property
    def state(self) -> DeviceState:
        return DeviceState(**json.loads(self.state_path.read_text()))

    @property
    def enrolled(self) -> bool:
        return self.state_path.exists() and self.chain_path.exists()

    def _save(
        self,
        key: ec.EllipticCurvePrivateKey,
        chain_pem: str,
        state: DeviceState,
        bundle: common_pb2.TrustBundle,
    ) -> None:
        # Key first (0600), then chain and bundle, then state: state.json is written last, so a
        # crash leaves a consistent identity on disk.
        write_atomic(self.key_path, _key_pem(key), mode=0o600)
        write_atomic(self.chain_path, chain_pem.encode("ascii"))
        if bundle.ca_certificates_pem:
            write_atomic(self.bundle_path, bundle.ca_certificates_pem.encode("ascii"))
            self.save_trust_bundle(bundle)
        write_atomic(self.state_path, json.dumps(asdict(state)).encode("utf-8"))

    # -- enrollment ----------------------------------------------------------------------------
    async def enroll(self, enrollment_token: str) -> DeviceState:
        """Enroll over the bootstrap listener with a one-time token."""
        key = ec.generate_private_key(ec.SECP256R1())
        request = bootstrap_pb2.EnrollDeviceRequest(
            csr_pem=make_csr(key), enrollment_token=enrollment_token
        )
        async with tls_channel(
            self.endpoints.bootstrap, self.bundle_path.read_bytes(), self.endpoints.server_name
        ) as ch:
            response = await bootstrap_pb2_grpc.BootstrapStub(ch).EnrollDevice(request, timeout=30)
        return self._store_enrollment(key, response)

    async def enroll_with_birth_certificate(
        self, birth_chain_pem: bytes, birth_key_pem: bytes
    ) -> DeviceState:
        """Enroll over the factory listener, proving identity with the factory birth certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        request = bootstrap_pb2.EnrollDeviceRequest(csr_pem=make_csr(key))
        async with mtls_channel(
            self.endpoints.factory,
            self.bundle_path.read_bytes(),
            birth_key_pem,
            birth_chain_pem,
            self.endpoints.server_name,
        ) as ch:
            response = await bootstrap_pb2_grpc.BootstrapStub(ch).EnrollDevice(request, timeout=30)
        return self._store_enrollment(key, response)

    def _store_enrollment(
        self, key: ec.EllipticCurvePrivateKey, response: bootstrap_pb2.EnrollDeviceResponse
    ) -> DeviceState:
        state = DeviceState(
            device_id=response.device_id,
            spiffe_id=response.spiffe_id,
            not_after=response.not_after,
            renew_after=response.renew_after,
            trust_bundle_version=response.trust_bundle.version,
            claim_code=response.claim_code,
        )
        self._save(key, response.certificate_chain_pem, state, response.trust_bundle)
        return state

    # -- main listener -------------------------------------------------------------------------
    def channel(self) -> grpc.aio.Channel:
        """A mutual-TLS channel to the main listener with the current device certificate."""
        return mtls_channel(
            self.endpoints.main,
            self.bundle_path.read_bytes(),
            self.key_path.read_bytes(),
            self.chain_path.read_bytes(),
            self.endpoints.server_name,
        )

    async def renew(self) -> DeviceState:
        """Get a new certificate (with a new key) for the same identity."""
        key = ec.generate_private_key(ec.SECP256R1())
        request = device_pb2.RenewCertificateRequest(csr_pem=make_csr(key))
        async with self.channel() as ch:
            response = await device_pb2_grpc.DeviceServiceStub(ch).RenewCertificate(
                request, timeout=30
            )
        old = self.state
        state = DeviceState(
            device_id=old.device_id,
            spiffe_id=old.spiffe_id,
            not_after=response.not_after,
            renew_after=response.renew_after,
            trust_bundle_version=response.trust_bundle.version,
            claim_code=old.claim_code,
        )
        self._save(key, response.certificate_chain_pem, state, response.trust_bundle)
        return state

    async def renew_if_due(self, now: float | None = None) -> bool:
        """Renew when renew_after has passed; returns whether it renewed."""
        if (now if now is not None else time.time()) < self.state.renew_after:
            return False
        await self.renew()
        return True

    @asynccontextmanager
    async def attach(self, heartbeat_interval: float = 15.0) -> AsyncIterator[AttachSession]:
        """Open the Attach stream, send hello, keep heartbeats going until the block exits."""
        async with self.channel() as ch:
            call = device_pb2_grpc.DeviceServiceStub(ch).Attach()
            session = AttachSession(call, self.state.trust_bundle_version)
            await call.write(
                device_pb2.DeviceMessage(
                    hello=device_pb2.Hello(trust_bundle_version=self.state.trust_bundle_version)
                )
            )
            beats = asyncio.create_task(session.heartbeats(heartbeat_interval))
            try:
                yield session
            finally:
                beats.cancel()
                with suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await beats
                call.cancel()


class AttachSession:
    """A live Attach stream: read broker messages, send heartbeats."""

    def __init__(self, call: grpc.aio.StreamStreamCall, bundle_version: str) -> None:
        self.call = call
        self._bundle_version = bundle_version
        self._sequence = 0

    async def receive(self, timeout: float | None = None) -> device_pb2.BrokerMessage | None:
        """The next broker message, or None when the stream ended cleanly."""
        message = await asyncio.wait_for(self.call.read(), timeout)
        if message is grpc.aio.EOF:
            return None
        result: device_pb2.BrokerMessage = message
        return result

    async def heartbeat(self) -> None:
        self._sequence += 1
        await self.call.write(
            device_pb2.DeviceMessage(
                heartbeat=device_pb2.Heartbeat(
                    sequence=self._sequence, trust_bundle_version=self._bundle_version
                )
            )
        )

    async def heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.heartbeat()


def ensure_private(path: Path) -> None:
    """Make a key file 0600 (used when importing keys made elsewhere)."""
    os.chmod(path, 0o600)


class DeviceTokenVerifier:
    """Device side of "two-way": a camera accepts only tokens for itself, signed by a key in its own
    trust bundle with that key's pinned algorithm, unexpired, with the stream scope (I5)."""

    def __init__(self, verifier: TokenVerifier, own_spiffe_id: str) -> None:
        self._verifier = verifier
        self._own = own_spiffe_id

    def verify(self, token: str) -> SessionClaims:
        """The claims of a token addressed to this camera; PermissionDenied otherwise."""
        claims = self._verifier.verify(token, self._own)
        if claims.audience != self._own:  # PyJWT checked aud too; keep the rule explicit here
            from broker.errors import PermissionDenied

            raise PermissionDenied("session token is for another device")
        return claims
