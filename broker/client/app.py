"""App SDK: what the phone app does — account, app-instance certificate, claim, share, sessions.

The app's key is generated here and never leaves; the identity lives in a directory
(``app.key`` 0600, ``app.pem``, ``ca-bundle.pem``, ``state.json``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from broker._proto.broker.v1 import (
    app_pb2,
    app_pb2_grpc,
    bootstrap_pb2,
    bootstrap_pb2_grpc,
    common_pb2,
)
from broker.client.bundle import load_bundle
from broker.client.device import (
    REFUSED_FOR_GOOD,
    ReenrollmentRequired,
    jittered_renewal,
    make_csr,
)
from broker.client.identity_dir import IdentityDir
from broker.clock import Clock, SystemClock
from broker.protocol.e2e import (
    FrameRejected,
    HandshakeError,
    Opener,
    SessionBinding,
    app_side,
    verify_device_chain,
)
from broker.protocol.spiffe_id import SpiffeId
from broker.protocol.tokens import cert_thumbprint


@dataclass(frozen=True, slots=True)
class AppState:
    user_id: str
    app_id: str
    spiffe_id: str
    not_after: int
    renew_after: int


@dataclass(frozen=True)
class SessionTicket:
    """What OpenSession returned, plus the app's ephemeral key for the end-to-end handshake."""

    device_id: str
    session_id: str
    token: str
    expires_at: int
    ephemeral_key: x25519.X25519PrivateKey

    @property
    def ephemeral_public(self) -> bytes:
        return self.ephemeral_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )


class AppClient(IdentityDir):
    """A phone app instance's view of the broker."""

    FILE_STEM = "app"

    @property
    def state(self) -> AppState:
        return AppState(**json.loads(self.state_path.read_text()))

    def _save(
        self,
        key: ec.EllipticCurvePrivateKey,
        chain_pem: str,
        state: AppState,
        bundle: common_pb2.TrustBundle,
    ) -> None:
        self._write_identity(key, chain_pem, asdict(state), bundle)

    # -- account -------------------------------------------------------------------------------
    async def create_account(self, username: str, password: str) -> str:
        """Sign up; returns the new user_id."""
        async with self._bootstrap() as ch:
            response = await bootstrap_pb2_grpc.BootstrapStub(ch).CreateAccount(
                bootstrap_pb2.CreateAccountRequest(username=username, password=password), timeout=30
            )
        return str(response.user_id)

    async def enroll(self, username: str, password: str, label: str = "") -> AppState:
        """Log in and get an app-instance certificate for a key made here."""
        key = self.new_key()
        request = bootstrap_pb2.EnrollAppRequest(
            username=username, password=password, csr_pem=make_csr(key), label=label
        )
        async with self._bootstrap() as ch:
            response = await bootstrap_pb2_grpc.BootstrapStub(ch).EnrollApp(request, timeout=30)
        state = AppState(
            response.user_id,
            response.app_id,
            response.spiffe_id,
            response.not_after,
            response.renew_after,
        )
        self._save(key, response.certificate_chain_pem, state, response.trust_bundle)
        return state

    async def renew(self) -> AppState:
        """New key, new certificate, same app instance."""
        key = self.new_key()
        async with self.channel() as ch:
            response = await app_pb2_grpc.AppServiceStub(ch).RenewCertificate(
                app_pb2.RenewAppCertificateRequest(csr_pem=make_csr(key)), timeout=30
            )
        return self._keep_renewed(key, response, self.state.spiffe_id)

    def _keep_renewed(
        self,
        key: ec.EllipticCurvePrivateKey,
        response: app_pb2.RenewAppCertificateResponse
        | bootstrap_pb2.RenewExpiredCertificateResponse,
        spiffe_id: str,
    ) -> AppState:
        """Store a renewal's certificate with its key: same app instance, new validity."""
        old = self.state
        state = AppState(
            old.user_id, old.app_id, spiffe_id, response.not_after, response.renew_after
        )
        self._save(key, response.certificate_chain_pem, state, response.trust_bundle)
        return state

    def renew_due_at(self) -> int:
        """When to renew: renew_after (2/3 of the lifetime) plus the same certificate-derived
        jitter as cameras, so app instances do not renew in lockstep."""
        state = self.state
        return jittered_renewal(state.renew_after, state.not_after, self.chain_path.read_bytes())

    async def renew_if_due(self, now: float | None = None) -> bool:
        """Renew once the jittered due time has passed. After expiry the app renews by itself
        with Bootstrap.RenewExpiredCertificate (within the broker's app window); when the broker
        refuses that, the user must log in again (EnrollApp), raised as ReenrollmentRequired."""
        moment = now if now is not None else time.time()
        state = self.state
        if moment >= state.not_after:
            await self._renew_after_expiry(moment)
            return True
        if moment < self.renew_due_at():
            return False
        await self.renew()
        return True

    async def renew_expired(self, now: float | None = None) -> AppState:
        """Renew an expired certificate over the bootstrap listener, proving possession of its
        key (docs/PROTOCOL.md 4.5): same app instance, new key."""
        moment = now if now is not None else time.time()
        key = self.pending_renewal_key()
        response = await self._renew_expired(key, int(moment))
        return self._keep_renewed(key, response, response.spiffe_id)

    async def _renew_after_expiry(self, moment: float) -> None:
        try:
            await self.renew_expired(moment)
        except grpc.aio.AioRpcError as error:
            if error.code() not in (*REFUSED_FOR_GOOD, grpc.StatusCode.INVALID_ARGUMENT):
                raise  # UNAVAILABLE and the like: try again later, with backoff
            try:  # still valid at the broker (this phone's clock is ahead): renew as usual
                await self.renew()
                return
            except grpc.aio.AioRpcError:
                pass
            if error.code() not in REFUSED_FOR_GOOD:
                raise error  # a malformed request or this phone's clock far off: fix, retry
            raise ReenrollmentRequired(
                "app certificate expired: log in again to enroll this app (the broker refused "
                f"renewal after expiry: {error.details()})"
            ) from error

    # -- devices -------------------------------------------------------------------------------
    async def claim(self, device_id: str, claim_code: str) -> None:
        async with self.channel() as ch:
            await app_pb2_grpc.AppServiceStub(ch).ClaimDevice(
                app_pb2.ClaimDeviceRequest(device_id=device_id, claim_code=claim_code), timeout=30
            )

    async def list_devices(self) -> list[app_pb2.MyDevice]:
        async with self.channel() as ch:
            response = await app_pb2_grpc.AppServiceStub(ch).ListDevices(
                app_pb2.ListMyDevicesRequest(), timeout=30
            )
        return list(response.devices)

    async def share(self, device_id: str, username: str, expires_at: int = 0) -> str:
        async with self.channel() as ch:
            response = await app_pb2_grpc.AppServiceStub(ch).ShareDevice(
                app_pb2.ShareDeviceRequest(
                    device_id=device_id, username=username, expires_at=expires_at
                ),
                timeout=30,
            )
        return str(response.user_id)

    async def revoke_share(self, device_id: str, username: str) -> int:
        async with self.channel() as ch:
            response = await app_pb2_grpc.AppServiceStub(ch).RevokeShare(
                app_pb2.RevokeShareRequest(device_id=device_id, username=username), timeout=30
            )
        return int(response.sessions_ended)

    async def open_session(self, device_id: str) -> SessionTicket:
        """A session token for device_id, with a fresh X25519 key for the end-to-end handshake."""
        ephemeral = x25519.X25519PrivateKey.generate()
        public = ephemeral.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        async with self.channel() as ch:
            response = await app_pb2_grpc.AppServiceStub(ch).OpenSession(
                app_pb2.OpenSessionRequest(device_id=device_id, app_ephemeral_public_key=public),
                timeout=30,
            )
        return SessionTicket(
            device_id, response.session_id, response.token, response.expires_at, ephemeral
        )

    def thumbprint(self) -> str:
        """x5t#S256 of this app instance's current certificate (what tokens are bound to)."""
        leaf = x509.load_pem_x509_certificate(self.chain_path.read_bytes())
        return cert_thumbprint(leaf.public_bytes(serialization.Encoding.DER))

    @asynccontextmanager
    async def watch(
        self, ticket: SessionTicket, clock: Clock | None = None
    ) -> AsyncIterator[WatchStream]:
        """Start the session's stream; iterate ``frames()`` for decrypted, verified media."""
        async with self.channel() as ch:
            call = app_pb2_grpc.AppServiceStub(ch).Watch(
                app_pb2.WatchRequest(
                    session_id=ticket.session_id,
                    token=ticket.token,
                    app_ephemeral_public_key=ticket.ephemeral_public,
                )
            )
            stream = WatchStream(call, ticket, self, clock or SystemClock())
            try:
                yield stream
            finally:
                call.cancel()

    async def list_access(self, device_id: str) -> list[app_pb2.AccessEntry]:
        async with self.channel() as ch:
            response = await app_pb2_grpc.AppServiceStub(ch).ListAccess(
                app_pb2.ListAccessRequest(device_id=device_id), timeout=30
            )
        return list(response.entries)

    async def sign_out(self) -> int:
        """Revoke this app instance; returns how many sessions ended."""
        async with self.channel() as ch:
            response = await app_pb2_grpc.AppServiceStub(ch).SignOut(
                app_pb2.SignOutRequest(), timeout=30
            )
        return int(response.sessions_ended)


class WatchStream:
    """The app's end of a stream: verifies the camera, then yields only frames that decrypt.

    Frames that fail (wrong key, replay, reorder) are never yielded; they are counted in
    ``rejected`` with their reasons in ``mismatches`` (I6).
    """

    def __init__(
        self, call: grpc.aio.UnaryStreamCall, ticket: SessionTicket, app: AppClient, clock: Clock
    ) -> None:
        self._call = call
        self._ticket = ticket
        self._app = app
        self._clock = clock
        self.opener: Opener | None = None
        self.hello: app_pb2.StreamHello | None = None
        self.end_reason: str | None = None
        self.rejected = 0
        self.mismatches: list[str] = []
        self.dropped = 0

    def _verify_hello(self, hello: app_pb2.StreamHello) -> Opener:
        ticket = self._ticket
        state = self._app.state
        trust_domain = SpiffeId.parse(state.spiffe_id).trust_domain
        expected = str(SpiffeId.device(trust_domain, ticket.device_id))
        if hello.session_id != ticket.session_id:
            raise HandshakeError("hello is for another session")
        leaf = verify_device_chain(
            hello.device_certificate_chain_pem,
            load_bundle(self._app.trust_path).issuing_cas(),
            expected,
            self._clock.now(),
        )
        binding = SessionBinding(
            ticket.session_id,
            expected,
            state.user_id,
            self._app.thumbprint(),
            ticket.ephemeral_public,
            hello.device_ephemeral_public_key,
        )
        return app_side(ticket.ephemeral_key, leaf, binding, hello.signature)

    async def frames(self) -> AsyncIterator[bytes]:
        """Plaintext frames in order; stops at the end event (``end_reason``) or stream close."""
        async for event in self._call:
            kind = event.WhichOneof("kind")
            if kind == "hello":
                self.hello = event.hello
                try:
                    self.opener = self._verify_hello(event.hello)
                except HandshakeError:
                    # The camera may hold a certificate from an issuing CA (or root) rotated in
                    # after this app last got the bundle: refresh it once, then verify again.
                    if not await self._app.refresh_trust_bundle():
                        raise
                    self.opener = self._verify_hello(event.hello)
            elif kind == "frame":
                self.dropped = event.frame.dropped
                if self.opener is None:
                    self.rejected += 1
                    self.mismatches.append("frame before a verified hello")
                    continue
                try:
                    yield self.opener.open(event.frame.sequence, event.frame.ciphertext)
                except FrameRejected as rejected:
                    self.rejected += 1
                    self.mismatches.append(rejected.message)
            elif kind == "end":
                self.end_reason = event.end.reason
                return
