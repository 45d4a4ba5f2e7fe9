"""Device SDK: what camera firmware does to get and keep its identity.

The key is generated on the device and never leaves it; the identity lives in a directory
(``device.key`` 0600, ``device.pem`` chain, ``ca-bundle.pem``, ``state.json``).
"""

from __future__ import annotations

import asyncio
import hashlib
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
from broker.client.bundle import load_bundle
from broker.client.channels import AddressSpec, mtls_channel, split_addresses, tls_channel
from broker.client.identity_dir import IdentityDir
from broker.clock import Clock, SystemClock
from broker.errors import PermissionDenied
from broker.pemfile import read_private_key
from broker.protocol.e2e import HandshakeError, Sealer, device_side, directly_issued
from broker.protocol.spiffe_id import SpiffeId
from broker.protocol.tokens import SessionClaims, TokenVerifier, key_hash


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the device remembers about its identity between boots."""

    device_id: str
    spiffe_id: str
    not_after: int
    renew_after: int
    trust_bundle_version: str
    claim_code: str = ""


class ReenrollmentRequired(Exception):
    """The device certificate expired; only a fresh enrollment can restore the identity."""


# Refusals of RenewExpiredCertificate that asking again cannot change (docs/PROTOCOL.md 4.5.3);
# INVALID_ARGUMENT (a malformed request, this device's clock off) is raised as is: fix and retry.
REFUSED_FOR_GOOD = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


class TlsHandshakeFailed(grpc.aio.AioRpcError):  # type: ignore[misc]
    """UNAVAILABLE because the TLS handshake with the broker failed, with the reason in plain words
    (gRPC itself only says "failed to connect to all addresses", or "Socket closed")."""

    def __init__(self, error: grpc.aio.AioRpcError, reason: str) -> None:
        super().__init__(
            error.code(),
            error.initial_metadata(),
            error.trailing_metadata(),
            f"{reason} [{error.details()}]",
            error.debug_error_string(),
        )
        self.reason = reason


def _chains_to_roots(chain_pem: bytes, roots_pem: bytes) -> bool:
    """Whether the chain's leaf reaches one of the roots directly or through the chain's CAs."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        roots = x509.load_pem_x509_certificates(roots_pem)
    except ValueError:
        return False
    current = chain[0]
    for _ in range(len(chain)):
        if any(directly_issued(current, root) for root in roots):
            return True
        parent = next(
            (c for c in chain[1:] if c is not current and directly_issued(current, c)), None
        )
        if parent is None:
            return False
        current = parent
    return False


def explain_handshake_failure(
    error: grpc.RpcError, ca_bundle_pem: bytes, chain_pem: bytes | None = None
) -> str | None:
    """Why a call to the broker failed in the TLS handshake, when that can be told; else None."""
    if error.code() is not grpc.StatusCode.UNAVAILABLE:
        return None
    if "CERTIFICATE_VERIFY_FAILED" in (error.details() or ""):
        return (
            "TLS handshake failed: the broker's certificate does not chain to a root in this "
            "device's trust bundle (ca-bundle.pem); the bundle is out of date (a root was retired "
            "while the device was offline): re-provision the trust bundle and re-enroll"
        )
    if chain_pem and not _chains_to_roots(chain_pem, ca_bundle_pem):
        return (
            "TLS handshake failed: this device's certificate does not chain to a root in its trust "
            "bundle, so the broker no longer accepts it (its root was retired before the device "
            "renewed): re-enroll with an enrollment token or the birth certificate"
        )
    return None


def jittered_renewal(renew_after: int, not_after: int, chain_pem: bytes) -> int:
    """renew_after plus a jitter derived from the certificate: up to a tenth of the time left
    after renew_after, at most an hour (stable for one certificate, spread across a fleet)."""
    window = min(3600, max(0, (not_after - renew_after) // 10))
    digest = hashlib.sha256(chain_pem).digest()
    return renew_after + (int.from_bytes(digest[:4], "big") % (window + 1))


@dataclass(frozen=True, slots=True, init=False)
class Endpoints:
    """Where the broker listens, and the name its certificate carries.

    Each listener may name several replicas: a comma-separated string or a list of addresses
    (``Endpoints(bootstrap, main=["10.0.0.1:8443", "10.0.0.2:8443"])``), or one DNS name with
    several addresses. They are kept as one comma-separated string; ``channels`` turns it into
    one gRPC target so that a new connection goes to a live replica.
    """

    bootstrap: str
    main: str
    factory: str
    server_name: str | None

    def __init__(
        self,
        bootstrap: AddressSpec,
        main: AddressSpec,
        factory: AddressSpec = "",
        server_name: str | None = None,
    ) -> None:
        object.__setattr__(self, "bootstrap", ",".join(split_addresses(bootstrap)))
        object.__setattr__(self, "main", ",".join(split_addresses(main)))
        object.__setattr__(self, "factory", ",".join(split_addresses(factory)))
        object.__setattr__(self, "server_name", server_name)

    @property
    def main_addresses(self) -> tuple[str, ...]:
        """Every address of the main listener, in the order given."""
        return split_addresses(self.main)


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    """A CSR proving possession of key. The broker ignores everything in it but the key."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


class DeviceClient(IdentityDir):
    """A camera's view of the broker: enroll, renew, attach."""

    FILE_STEM = "device"

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The device key (generated here at enrollment or renewal)."""
        return read_private_key(self.key_path)

    def token_verifier(self, clock: Clock | None = None) -> DeviceTokenVerifier:
        """The camera's own check of session tokens, against its own trust bundle and identity."""
        bundle = load_bundle(self.trust_path)
        state = self.state
        trust_domain = SpiffeId.parse(state.spiffe_id).trust_domain
        return DeviceTokenVerifier(
            TokenVerifier(
                bundle.jwks_json, str(SpiffeId.broker(trust_domain)), clock or SystemClock()
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
        self._write_identity(key, chain_pem, asdict(state), bundle)

    # -- enrollment ----------------------------------------------------------------------------
    async def enroll(self, enrollment_token: str) -> DeviceState:
        """Enroll over the bootstrap listener with a one-time token."""
        key = self.new_key()
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
        key = self.new_key()
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
    def explained(self, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        """error, or a TlsHandshakeFailed saying why the handshake failed when that can be told."""
        chain = self.chain_path.read_bytes() if self.chain_path.exists() else None
        reason = explain_handshake_failure(error, self.bundle_path.read_bytes(), chain)
        return error if reason is None else TlsHandshakeFailed(error, reason)

    @asynccontextmanager
    async def _clear_tls_failures(self) -> AsyncIterator[None]:
        try:
            yield
        except grpc.aio.AioRpcError as error:
            clear = self.explained(error)
            if clear is error and await self._bundle_was_stale(error):
                clear = self.explained(error)  # judged again against the broker's current bundle
            if clear is error:
                raise
            raise clear from error

    async def _bundle_was_stale(self, error: grpc.aio.AioRpcError) -> bool:
        """After the broker refused our handshake, fetch its current bundle (TLS verified with
        the roots held); True when it differed. A retired root shows up only this way when the
        bundle without it was never pushed (the stream it would have come on was ended)."""
        details = error.details() or ""
        refused_in_handshake = (
            "failed to connect" in details and "Connection refused" not in details
        )
        if error.code() is not grpc.StatusCode.UNAVAILABLE or not refused_in_handshake:
            return False  # a status the broker sent, or no broker listening: nothing to learn
        try:
            return await self.refresh_trust_bundle()
        except grpc.aio.AioRpcError:
            return False

    async def renew(self) -> DeviceState:
        """Get a new certificate (with a new key) for the same identity."""
        key = self.new_key()
        request = device_pb2.RenewCertificateRequest(csr_pem=make_csr(key))
        async with self._clear_tls_failures(), self.channel() as ch:
            response = await device_pb2_grpc.DeviceServiceStub(ch).RenewCertificate(
                request, timeout=30
            )
        return self._keep_renewed(key, response, self.state.spiffe_id)

    def _keep_renewed(
        self,
        key: ec.EllipticCurvePrivateKey,
        response: device_pb2.RenewCertificateResponse
        | bootstrap_pb2.RenewExpiredCertificateResponse,
        spiffe_id: str,
    ) -> DeviceState:
        """Store a renewal's certificate with its key: same device, new validity."""
        old = self.state
        state = DeviceState(
            device_id=old.device_id,
            spiffe_id=spiffe_id,
            not_after=response.not_after,
            renew_after=response.renew_after,
            trust_bundle_version=response.trust_bundle.version,
            claim_code=old.claim_code,
        )
        self._save(key, response.certificate_chain_pem, state, response.trust_bundle)
        return state

    def renew_due_at(self) -> int:
        """When to renew: renew_after plus a jitter derived from this certificate (up to a tenth
        of the remaining lifetime, at most an hour), so a fleet does not renew in lockstep."""
        state = self.state
        return jittered_renewal(state.renew_after, state.not_after, self.chain_path.read_bytes())

    async def renew_if_due(self, now: float | None = None) -> bool:
        """Renew once the jittered due time has passed; returns whether it renewed.

        After expiry the camera renews by itself with Bootstrap.RenewExpiredCertificate (proof of
        the expired key, no token). When the broker refuses that (expired beyond its window,
        revoked, replaced), this raises ReenrollmentRequired with the broker's reason: the camera
        must enroll again (token or birth certificate), never silently. ``now`` is this device's
        clock (also the signed timestamp).
        """
        moment = now if now is not None else time.time()
        if moment >= self.state.not_after:
            await self._renew_after_expiry(moment)
            return True
        if moment < self.renew_due_at():
            return False
        await self.renew()
        return True

    async def renew_expired(self, now: float | None = None) -> DeviceState:
        """Renew an expired certificate over the bootstrap listener, proving possession of its
        key (docs/PROTOCOL.md 4.5); a new key is certified and stored like a renewal's."""
        moment = now if now is not None else time.time()
        key = self.pending_renewal_key()
        response = await self._renew_expired(key, int(moment))
        return self._keep_renewed(key, response, response.spiffe_id)

    async def _renew_after_expiry(self, moment: float) -> None:
        expired_at = self.state.not_after
        try:
            await self.renew_expired(moment)
        except grpc.aio.AioRpcError as error:
            if error.code() not in (*REFUSED_FOR_GOOD, grpc.StatusCode.INVALID_ARGUMENT):
                raise  # UNAVAILABLE and the like: try again later, with backoff
            if await self._still_valid_at_broker():
                return
            if error.code() not in REFUSED_FOR_GOOD:
                raise error  # a malformed request or this device's clock far off: fix, retry
            raise ReenrollmentRequired(
                f"device certificate expired at {expired_at}: enroll again with a fresh "
                "enrollment token or the factory birth certificate (the broker refused renewal "
                f"after expiry: {error.details()})"
            ) from error

    async def ensure_identity(
        self, now: float | None = None, birth: tuple[bytes, bytes] | None = None
    ) -> str:
        """Keep the identity usable: 'ok', 'renewed', or 're-enrolled' (with the birth
        certificate and key, when given, after expiry). Raises ReenrollmentRequired otherwise."""
        try:
            return "renewed" if await self.renew_if_due(now) else "ok"
        except ReenrollmentRequired:
            if birth is None:
                raise
            await self.enroll_with_birth_certificate(*birth)
            return "re-enrolled"

    async def _still_valid_at_broker(self) -> bool:
        """After a refused renewal after expiry: whether the ordinary renewal works, i.e. the
        broker still counts the certificate valid (this device's clock is ahead of it)."""
        try:
            await self.renew()
        except grpc.aio.AioRpcError:
            return False
        return True

    @asynccontextmanager
    async def attach(self, heartbeat_interval: float = 15.0) -> AsyncIterator[AttachSession]:
        """Open the Attach stream, send hello, keep heartbeats going until the block exits."""
        async with self.channel() as ch:
            call = device_pb2_grpc.DeviceServiceStub(ch).Attach()
            session = AttachSession(call, self)
            async with self._clear_tls_failures():
                await session._write(
                    device_pb2.DeviceMessage(
                        hello=device_pb2.Hello(trust_bundle_version=self.state.trust_bundle_version)
                    )
                )
            beats = asyncio.create_task(session.heartbeats(heartbeat_interval))
            try:
                async with self._clear_tls_failures():
                    yield session
            finally:
                beats.cancel()
                with suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await beats
                call.cancel()


@dataclass
class OutgoingStream:
    """A session this camera agreed to stream: frames are sealed to the app's key."""

    session_id: str
    claims: SessionClaims
    sealer: Sealer


class AttachSession:
    """A live Attach stream: broker messages in; heartbeats, stream handshakes and frames out."""

    def __init__(self, call: grpc.aio.StreamStreamCall, client: DeviceClient) -> None:
        self.call = call
        self._client = client
        self._bundle_version = client.state.trust_bundle_version
        self._sequence = 0
        self._write_lock = asyncio.Lock()  # grpc allows one outstanding write per call

    async def _write(self, message: device_pb2.DeviceMessage) -> None:
        # grpc.aio cancels the whole RPC when a task is cancelled inside call.write(); callers
        # cancel senders freely (a stopped stream's frame task), so the write itself is shielded
        # and completes (holding the lock) even if the caller stops waiting for it.
        write = asyncio.ensure_future(self._locked_write(message))
        # If the caller has gone, nobody awaits the write: read its outcome so asyncio does not
        # report it as never retrieved (the stream's own end is reported elsewhere).
        write.add_done_callback(lambda task: task.cancelled() or task.exception())
        await asyncio.shield(write)

    async def _locked_write(self, message: device_pb2.DeviceMessage) -> None:
        async with self._write_lock:
            await self.call.write(message)

    async def receive(self, timeout: float | None = None) -> device_pb2.BrokerMessage | None:
        """The next broker message, or None when the stream ended cleanly."""
        message = await asyncio.wait_for(self.call.read(), timeout)
        if message is grpc.aio.EOF:
            return None
        result: device_pb2.BrokerMessage = message
        return result

    async def heartbeat(self) -> None:
        self._sequence += 1
        await self._write(
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

    def adopt_bundle(self, update: device_pb2.TrustBundleUpdate) -> None:
        """Keep a trust bundle the broker pushed; later heartbeats acknowledge its version."""
        self._client.save_trust_bundle(update.trust_bundle)
        self._bundle_version = update.trust_bundle.version

    async def accept_stream(
        self, start: device_pb2.StartStream, clock: Clock | None = None
    ) -> OutgoingStream:
        """Verify the session token as this camera (I5) and answer with the signed handshake.

        Any failure is answered with a StreamReject and re-raised as PermissionDenied.
        """
        state = self._client.state
        try:
            claims = self._client.token_verifier(clock).verify(start.token)
            if claims.session_id != start.session_id:
                raise PermissionDenied("token was minted for another session")
            if key_hash(start.app_ephemeral_public_key) != claims.ephemeral_key_hash:
                raise PermissionDenied("app key does not match the session token")
            try:
                device_ephemeral, signature, sealer = device_side(
                    self._client.private_key(),
                    start.session_id,
                    state.spiffe_id,
                    claims.user_id,
                    claims.cnf_thumbprint,
                    start.app_ephemeral_public_key,
                )
            except HandshakeError as failed:  # e.g. a low-order app key
                raise PermissionDenied(failed.message) from None
        except PermissionDenied as refused:
            await self._write(
                device_pb2.DeviceMessage(
                    stream_reject=device_pb2.StreamReject(
                        session_id=start.session_id, reason=refused.message
                    )
                )
            )
            raise
        await self._write(
            device_pb2.DeviceMessage(
                stream_accept=device_pb2.StreamAccept(
                    session_id=start.session_id,
                    device_ephemeral_public_key=device_ephemeral,
                    signature=signature,
                )
            )
        )
        return OutgoingStream(start.session_id, claims, sealer)

    async def send_frame(self, stream: OutgoingStream, plaintext: bytes) -> int:
        """Seal and send one frame; returns its sequence number."""
        sequence, ciphertext = stream.sealer.seal(plaintext)
        await self.send_raw_frame(stream.session_id, sequence, ciphertext)
        return sequence

    async def send_raw_frame(self, session_id: str, sequence: int, ciphertext: bytes) -> None:
        """Send an already sealed frame (also used by tests that forge frames)."""
        await self._write(
            device_pb2.DeviceMessage(
                media_frame=device_pb2.MediaFrame(
                    session_id=session_id, sequence=sequence, ciphertext=ciphertext
                )
            )
        )

    async def close_stream(self, session_id: str, reason: str) -> None:
        await self._write(
            device_pb2.DeviceMessage(
                stream_closed=device_pb2.StreamClosed(session_id=session_id, reason=reason)
            )
        )


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
            raise PermissionDenied("session token is for another device")
        return claims
