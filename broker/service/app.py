"""AppService: the phone app's RPCs. Callers are app instances, identified by certificate only."""

from __future__ import annotations

import asyncio

import grpc

from broker._proto.broker.v1 import app_pb2, app_pb2_grpc
from broker.clock import unix
from broker.errors import Unavailable
from broker.identity.spiffe import device
from broker.protocol.spiffe_id import SpiffeId
from broker.protocol.tokens import cert_thumbprint
from broker.service.convert import trust_bundle_pb
from broker.service.effects import EffectsApplier
from broker.service.interceptor import current_caller
from broker.service.runtime import Runtime
from broker.sessions.relay import LiveSession, Rejected
from broker.store import Role

HANDSHAKE_TIMEOUT = 10.0
ROLE_PB = {Role.OWNER: app_pb2.ROLE_OWNER, Role.VIEWER: app_pb2.ROLE_VIEWER}


def caller_thumbprint() -> str:
    """RFC 8705 x5t#S256 of the certificate the caller presented on this connection."""
    return cert_thumbprint(bytes.fromhex(current_caller().fingerprint), prehashed=True)


class AppService(app_pb2_grpc.AppServiceServicer):
    """Thin handlers over accounts, ownership and sessions."""

    def __init__(self, runtime: Runtime, effects: EffectsApplier) -> None:
        self._rt = runtime
        self._effects = effects

    async def RenewCertificate(
        self, request: app_pb2.RenewAppCertificateRequest, context: grpc.aio.ServicerContext
    ) -> app_pb2.RenewAppCertificateResponse:
        issued = await self._rt.run(
            self._rt.accounts.renew_app, current_caller().identity, request.csr_pem
        )
        return app_pb2.RenewAppCertificateResponse(
            certificate_chain_pem=issued.chain_pem,
            trust_bundle=trust_bundle_pb(self._rt.trust_bundle),
            not_after=unix(issued.not_after),
            renew_after=unix(issued.renew_after),
        )

    async def ClaimDevice(
        self, request: app_pb2.ClaimDeviceRequest, context: grpc.aio.ServicerContext
    ) -> app_pb2.ClaimDeviceResponse:
        await self._rt.run(
            self._rt.ownership.claim,
            current_caller().identity,
            request.device_id,
            request.claim_code,
        )
        return app_pb2.ClaimDeviceResponse(device_id=request.device_id)

    async def ListDevices(
        self, request: app_pb2.ListMyDevicesRequest, context: grpc.aio.ServicerContext
    ) -> app_pb2.ListMyDevicesResponse:
        access = await self._rt.run(self._rt.ownership.devices_of, current_caller().identity)
        td = self._rt.config.trust_domain
        return app_pb2.ListMyDevicesResponse(
            devices=[
                app_pb2.MyDevice(
                    device_id=a.device.device_id,
                    role=ROLE_PB[a.grant.role],
                    online=self._rt.presence.is_online(a.device.device_id),
                    expires_at=a.grant.expires_at or 0,
                    spiffe_id=device(td, a.device.device_id).spiffe_id,
                )
                for a in access
            ]
        )

    async def ShareDevice(
        self, request: app_pb2.ShareDeviceRequest, context: grpc.aio.ServicerContext
    ) -> app_pb2.ShareDeviceResponse:
        user_id = await self._rt.run(
            self._rt.ownership.share,
            current_caller().identity,
            request.device_id,
            request.username,
            request.expires_at,
        )
        return app_pb2.ShareDeviceResponse(device_id=request.device_id, user_id=user_id)

    async def RevokeShare(
        self, request: app_pb2.RevokeShareRequest, context: grpc.aio.ServicerContext
    ) -> app_pb2.RevokeShareResponse:
        revoked = await self._rt.run(
            self._rt.ownership.revoke_share,
            current_caller().identity,
            request.device_id,
            request.username,
        )
        self._effects.apply(revoked.effects)
        return app_pb2.RevokeShareResponse(sessions_ended=len(revoked.sessions_ended))

    async def OpenSession(
        self, request: app_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> app_pb2.OpenSessionResponse:
        opened = await self._rt.run(
            self._rt.sessions.open,
            current_caller().identity,
            caller_thumbprint(),
            request.device_id,
            request.app_ephemeral_public_key,
        )
        return app_pb2.OpenSessionResponse(
            session_id=opened.session_id, token=opened.token, expires_at=opened.expires_at
        )

    async def SignOut(
        self, request: app_pb2.SignOutRequest, context: grpc.aio.ServicerContext
    ) -> app_pb2.SignOutResponse:
        caller = current_caller().identity
        revoked = await self._rt.run(
            self._rt.accounts.revoke_app, caller, caller.name, caller.app_id, "signed out"
        )
        self._effects.apply(revoked.effects)
        return app_pb2.SignOutResponse(sessions_ended=len(revoked.sessions_ended))

    async def Watch(self, request: app_pb2.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        caller = current_caller()
        claims = await self._rt.run(
            self._rt.sessions.verify_for_watch,
            caller.identity,
            caller_thumbprint(),
            request.session_id,
            request.token,
            request.app_ephemeral_public_key,
        )
        device_id = SpiffeId.parse(claims.audience).device_id  # aud was checked exactly
        live = self._rt.relay.open(
            claims.session_id, device_id, claims.user_id, claims.app_id, claims.expires_at
        )
        try:
            await self._stream(context, live, request)
        finally:
            self._rt.relay.detach(live)
            # Shielded: the app hangs up as soon as it reads the end event, which cancels this
            # handler; the close (bytes, reason, audit entry) must be recorded all the same.
            await asyncio.shield(
                self._rt.run(
                    self._rt.sessions.record_close,
                    live.session_id,
                    live.end_reason or "watcher left",
                    live.bytes_relayed,
                    live.frames_relayed,
                    live.dropped,
                )
            )

    async def _stream(
        self, context: grpc.aio.ServicerContext, live: LiveSession, request: app_pb2.WatchRequest
    ) -> None:
        if not self._rt.relay.start(live, request.token, request.app_ephemeral_public_key):
            raise Unavailable("the camera is offline; try again when it is attached")
        try:
            outcome = await asyncio.wait_for(asyncio.shield(live.handshake), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            raise Unavailable("the camera did not answer the stream request in time") from None
        if isinstance(outcome, Rejected):
            await context.write(app_pb2.StreamEvent(end=app_pb2.StreamEnd(reason=outcome.reason)))
            return
        await context.write(
            app_pb2.StreamEvent(
                hello=app_pb2.StreamHello(
                    session_id=live.session_id,
                    device_id=live.device_id,
                    device_certificate_chain_pem=outcome.device_chain_pem,
                    device_ephemeral_public_key=outcome.device_ephemeral,
                    signature=outcome.signature,
                )
            )
        )
        while True:
            await live.wake.wait()
            for sequence, ciphertext in live.take():
                await context.write(
                    app_pb2.StreamEvent(
                        frame=app_pb2.StreamFrame(
                            sequence=sequence, ciphertext=ciphertext, dropped=live.dropped
                        )
                    )
                )
            if live.ended:
                await context.write(
                    app_pb2.StreamEvent(end=app_pb2.StreamEnd(reason=live.end_reason or ""))
                )
                return

    async def ListAccess(
        self, request: app_pb2.ListAccessRequest, context: grpc.aio.ServicerContext
    ) -> app_pb2.ListAccessResponse:
        entries = await self._rt.run(
            self._rt.sessions.access_log, current_caller().identity, request.device_id
        )
        return app_pb2.ListAccessResponse(
            entries=[
                app_pb2.AccessEntry(
                    session_id=e.session_id,
                    user_id=e.user_id,
                    username=e.username,
                    app_id=e.app_id,
                    app_label=e.app_label,
                    started_at=e.started_at,
                    ended_at=e.ended_at,
                    outcome=e.outcome,
                    reason=e.reason,
                    bytes=e.bytes,
                )
                for e in entries
            ]
        )
