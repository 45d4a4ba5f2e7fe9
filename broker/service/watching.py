"""Serving one watched session from this replica's Attach stream of its camera.

Shared by AppService.Watch (the camera is attached here) and ReplicaService.ForwardWatch (another
replica forwards the app's Watch here): the same start, handshake, frames and end event, written
through ``write`` to whichever call is being served. The per-frame identity check (I6) stays in the
relay, where the Attach stream is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from broker._proto.broker.v1 import app_pb2
from broker.errors import Unavailable
from broker.protocol.tokens import SessionClaims
from broker.service.runtime import Runtime
from broker.sessions.relay import LiveSession, Rejected

HANDSHAKE_TIMEOUT = 10.0
OFFLINE = "the camera is offline; try again when it is attached"

Write = Callable[[app_pb2.StreamEvent], Awaitable[None]]


async def serve_session(
    rt: Runtime, live: LiveSession, request_token: str, app_key: bytes, write: Write
) -> None:
    """Ask the attached camera to start live's session, then write its hello, frames and end."""
    if not rt.relay.start(live, request_token, app_key):
        raise Unavailable(OFFLINE)
    try:
        outcome = await asyncio.wait_for(asyncio.shield(live.handshake), HANDSHAKE_TIMEOUT)
    except TimeoutError:
        raise Unavailable("the camera did not answer the stream request in time") from None
    if isinstance(outcome, Rejected):
        await write(app_pb2.StreamEvent(end=app_pb2.StreamEnd(reason=outcome.reason)))
        return
    await write(
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
            await write(
                app_pb2.StreamEvent(
                    frame=app_pb2.StreamFrame(
                        sequence=sequence, ciphertext=ciphertext, dropped=live.dropped
                    )
                )
            )
        if live.ended:
            await write(app_pb2.StreamEvent(end=app_pb2.StreamEnd(reason=live.end_reason or "")))
            return


async def watch_locally(
    rt: Runtime,
    claims: SessionClaims,
    device_id: str,
    request_token: str,
    app_key: bytes,
    write: Write,
    *,
    on_open: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Register the watcher of the verified session claims, serve it, and record its close
    (bytes, reason, audit).

    on_open runs once the session is registered on this relay (from then on its close is recorded
    here, whatever happens next)."""
    live = rt.relay.open(
        claims.session_id, device_id, claims.user_id, claims.app_id, claims.expires_at
    )
    try:
        if on_open is not None:
            await on_open()
        await serve_session(rt, live, request_token, app_key, write)
    finally:
        rt.relay.detach(live)
        # Shielded: the app hangs up as soon as it reads the end event, which cancels this
        # handler; the close (bytes, reason, audit entry) must be recorded all the same.
        await asyncio.shield(
            rt.run(
                rt.sessions.record_close,
                live.session_id,
                live.end_reason or "watcher left",
                live.bytes_relayed,
                live.frames_relayed,
                live.dropped,
            )
        )
