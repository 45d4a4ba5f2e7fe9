"""AppService: the phone app's RPCs. Callers are app instances, identified by certificate only."""

from __future__ import annotations

import asyncio
import logging

import grpc

from broker._proto.broker.internal.v1 import replica_pb2
from broker._proto.broker.v1 import app_pb2, app_pb2_grpc
from broker.clock import now_s, unix
from broker.errors import Unavailable
from broker.identity.spiffe import Identity, device
from broker.protocol.spiffe_id import SpiffeId
from broker.protocol.tokens import SessionClaims, cert_thumbprint
from broker.service.convert import trust_bundle_pb
from broker.service.effects import EffectsApplier
from broker.service.forward import STALE_EPOCH, ForwardClient, holder_took_session
from broker.service.interceptor import current_caller
from broker.service.runtime import Runtime
from broker.service.watching import HANDSHAKE_TIMEOUT, OFFLINE, watch_locally
from broker.store import AttachmentRecord, ReplicaRecord, Role, SessionOutcome

log = logging.getLogger("broker.app")
__all__ = ["HANDSHAKE_TIMEOUT", "ROLE_PB", "AppService", "caller_thumbprint"]
# Seconds between looks at the store while a Watch waits for its camera to re-attach (a local
# attach wakes it at once).
WAIT_POLLS = (0.25, 0.5, 1.0)
ROLE_PB = {Role.OWNER: app_pb2.ROLE_OWNER, Role.VIEWER: app_pb2.ROLE_VIEWER}


def caller_thumbprint() -> str:
    """RFC 8705 x5t#S256 of the certificate the caller presented on this connection."""
    return cert_thumbprint(bytes.fromhex(current_caller().fingerprint), prehashed=True)


class AppService(app_pb2_grpc.AppServiceServicer):
    """Thin handlers over accounts, ownership and sessions."""

    def __init__(self, runtime: Runtime, effects: EffectsApplier) -> None:
        self._rt = runtime
        self._effects = effects
        self._forwarder = ForwardClient(runtime.config)
        # Watch calls this replica forwards to a holder, by session id; ended by drain().
        self._forwarded: dict[str, grpc.aio.UnaryStreamCall] = {}
        self._drain_reason: str | None = None  # set by drain(): the reason every Watch ends with
        self._ended_by_drain: set[str] = set()  # forwarded calls drain() cancelled

    async def RenewCertificate(
        self, request: app_pb2.RenewAppCertificateRequest, context: grpc.aio.ServicerContext
    ) -> app_pb2.RenewAppCertificateResponse:
        caller = current_caller().identity
        prepared = await self._rt.run_signing(
            self._rt.accounts.prepare_app_certificate, caller, request.csr_pem
        )
        issued = await self._rt.run(self._rt.accounts.renew_app, caller, prepared)
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
                    online=a.online,
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
        rt = self._rt
        rt.require_fresh_feed()
        minted = await rt.run_signing(
            rt.sessions.mint,
            current_caller().identity,
            caller_thumbprint(),
            request.device_id,
            request.app_ephemeral_public_key,
        )
        opened = await rt.run(rt.sessions.record_opened, minted)
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
        rt = self._rt
        rt.require_fresh_feed()
        caller = current_caller()
        thumbprint = caller_thumbprint()
        claims, attachment, holder = await rt.run(
            self._admit_watch, caller.identity, thumbprint, request
        )
        device_id = SpiffeId.parse(claims.audience).device_id  # aud was checked exactly
        # A camera that is re-attaching (a replica restarting, a reconnect storm) is waited for,
        # bounded, so that one watcher costs one session instead of one per retry.
        loop = asyncio.get_running_loop()
        wait = min(rt.config.watch_wait_seconds, claims.expires_at - now_s(rt.clock))
        deadline = loop.time() + max(wait, 0.0)
        polls = 0
        while True:
            route = self._route(device_id, attachment, holder)
            if route == "here":
                await watch_locally(
                    rt,
                    claims,
                    device_id,
                    request.token,
                    request.app_ephemeral_public_key,
                    context.write,
                )
                return
            if route == "forward" and attachment is not None and holder is not None:
                forwarded = replica_pb2.ForwardWatchRequest(
                    session_id=request.session_id,
                    token=request.token,
                    app_ephemeral_public_key=request.app_ephemeral_public_key,
                    app_spiffe_id=caller.identity.spiffe_id,
                    cnf_thumbprint=thumbprint,
                    attach_epoch=attachment.epoch,
                )
                if await self._forward_watch(
                    context, holder.internal_address, forwarded, may_reroute=True
                ):
                    return
            if self._drain_reason is not None or loop.time() >= deadline:
                break
            await rt.presence.wait_attached(
                device_id, min(WAIT_POLLS[min(polls, len(WAIT_POLLS) - 1)], deadline - loop.time())
            )
            polls += 1
            # Checked again, not only located: a revocation while this Watch waited ended the
            # session in the store, and nothing is streamed for it (I7).
            claims, attachment, holder = await rt.run(
                self._verify_and_locate, caller.identity, thumbprint, request
            )
        # Offline: closed as a local Watch of an unattached camera is (the app opens a new one).
        await asyncio.shield(
            rt.run(rt.sessions.record_close, claims.session_id, "watcher left", 0, 0, 0)
        )
        raise Unavailable(f"{OFFLINE} (waited {wait:.0f} s)" if wait >= 1 else OFFLINE)

    def _admit_watch(
        self, identity: Identity, thumbprint: str, request: app_pb2.WatchRequest
    ) -> tuple[SessionClaims, AttachmentRecord | None, ReplicaRecord | None]:
        """One core hop for a Watch: verify the session, mark it served here, find the camera."""
        claims, attachment, holder = self._verify_and_locate(identity, thumbprint, request)
        self._rt.sessions.served_here(claims.session_id)
        return claims, attachment, holder

    def _verify_and_locate(
        self, identity: Identity, thumbprint: str, request: app_pb2.WatchRequest
    ) -> tuple[SessionClaims, AttachmentRecord | None, ReplicaRecord | None]:
        """The session verified (token, binding, record still open, grant) and its camera's
        attachment (core thread)."""
        claims = self._rt.sessions.verify_for_watch(
            identity,
            thumbprint,
            request.session_id,
            request.token,
            request.app_ephemeral_public_key,
        )
        attachment, holder = self._attachment_of(SpiffeId.parse(claims.audience).device_id)
        return claims, attachment, holder

    def _route(
        self,
        device_id: str,
        attachment: AttachmentRecord | None,
        holder: ReplicaRecord | None,
    ) -> str:
        """Where the camera's Attach stream is: "here", "forward" (another replica), or ""."""
        rt = self._rt
        live_elsewhere = (
            attachment is not None
            and attachment.replica != rt.replica
            and attachment.live_at(now_s(rt.clock))
        )
        handle = rt.presence.handle(device_id)
        if handle is not None and (
            attachment is None
            or handle.epoch == attachment.epoch
            # attached here a moment ago, its epoch not recorded yet, and held nowhere else
            or (handle.epoch == 0 and not live_elsewhere)
        ):
            return "here"
        if live_elsewhere and holder is not None and holder.internal_address:
            return "forward"
        return ""

    def _attachment_of(
        self, device_id: str
    ) -> tuple[AttachmentRecord | None, ReplicaRecord | None]:
        """The device's attachment and, when another replica holds it, that replica (core thread)."""
        with self._rt.store.read() as tx:
            attachment = tx.get_attachment(device_id)
            if attachment is None or attachment.replica in ("", self._rt.replica):
                return attachment, None
            return attachment, tx.get_replica(attachment.replica)

    async def _forward_watch(
        self,
        context: grpc.aio.ServicerContext,
        address: str,
        request: replica_pb2.ForwardWatchRequest,
        *,
        may_reroute: bool = False,
    ) -> bool:
        """Relay the holder's StreamEvents to the app unchanged; its status, if it ends with one,
        becomes this call's status. The holder records the close once it took the session.

        Returns False, having sent the app nothing, when may_reroute and the holder refused a
        stale epoch before taking the session (the camera moved: route again); True otherwise."""
        if self._drain_reason is not None:  # a Watch set up while the drain began
            reason = self._drain_reason
            await asyncio.shield(self._rt.run(self._rt.sessions.end, [request.session_id], reason))
            await context.write(app_pb2.StreamEvent(end=app_pb2.StreamEnd(reason=reason)))
            return True
        call = self._forwarder.forward_watch(address, request)  # no await until registered
        self._forwarded[request.session_id] = call
        taken = False
        try:
            async for event in call:
                taken = True
                await context.write(event)
        except asyncio.CancelledError:
            if request.session_id not in self._ended_by_drain or self._drain_reason is None:
                raise  # the app hung up
            end = app_pb2.StreamEnd(reason=self._drain_reason)
            await context.write(app_pb2.StreamEvent(end=end))
        except grpc.aio.AioRpcError as error:
            taken = taken or holder_took_session(error.initial_metadata())
            if may_reroute and not taken and error.details() == STALE_EPOCH:
                return False  # the camera moved after this replica looked: route again
            log.info(
                "forwarded watch ended session=%s holder=%s code=%s taken=%s",
                request.session_id,
                address,
                error.code().name,
                taken,
            )
            if taken:
                # The holder went away mid-stream without its own close (e.g. it was killed).
                await asyncio.shield(
                    self._rt.run(
                        self._close_if_open,
                        request.session_id,
                        f"the camera's replica ended the stream: {error.details() or ''}"[:200],
                    )
                )
            details = tuple(
                (key, value)
                for key, value in error.trailing_metadata() or ()
                if key == "grpc-status-details-bin"
            )
            await context.abort(error.code(), error.details() or "", details)
        finally:
            self._forwarded.pop(request.session_id, None)
            self._ended_by_drain.discard(request.session_id)
            call.cancel()  # the app left: the holder's handler ends and records the close
        return True

    async def close(self) -> None:
        """Close the channels to other replicas (at stop, after the listeners)."""
        await self._forwarder.close()

    async def end_forwarded(self, reason: str) -> int:
        """End every Watch this replica forwards, and any it would forward from now on (drain):
        each session is ended in the store with reason before its holder sees the cancel (the
        holder then records only the bytes), and each app gets a StreamEnd with reason. Returns
        how many were ended."""
        self._drain_reason = reason
        calls = dict(self._forwarded)
        self._ended_by_drain.update(calls)
        await self._rt.run(self._rt.sessions.end, sorted(calls), reason)
        for call in calls.values():
            call.cancel()
        return len(calls)

    def _close_if_open(self, session_id: str, reason: str) -> None:
        with self._rt.store.read() as tx:
            record = tx.get_session(session_id)
        if record is not None and record.outcome is SessionOutcome.OPENED:
            self._rt.sessions.record_close(session_id, reason, 0, 0, 0)

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
