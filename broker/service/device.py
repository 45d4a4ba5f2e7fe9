"""DeviceService: certificate renewal, factory reset, and the camera's Attach stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import grpc

from broker._proto.broker.v1 import device_pb2, device_pb2_grpc
from broker.clock import unix
from broker.errors import BrokerError, InvalidArgument, Unauthenticated
from broker.pki.ca import authority_key_id, renewal_due_at
from broker.service.convert import trust_bundle_pb
from broker.service.effects import EffectsApplier
from broker.service.interceptor import abort_with, current_caller
from broker.service.runtime import Runtime
from broker.sessions.attachments import REPLACED
from broker.sessions.presence import CLOSED, AttachHandle
from broker.sessions.relay import Accepted, StartStreamCommand, StopStreamCommand

MAX_FRAME_BYTES = 60 * 1024


def command_pb(item: object) -> device_pb2.BrokerMessage:
    """Core relay commands as protobuf; protobuf messages pass through."""
    if isinstance(item, StartStreamCommand):
        return device_pb2.BrokerMessage(
            start_stream=device_pb2.StartStream(
                session_id=item.session_id,
                token=item.token,
                app_ephemeral_public_key=item.app_ephemeral,
            )
        )
    if isinstance(item, StopStreamCommand):
        return device_pb2.BrokerMessage(
            stop_stream=device_pb2.StopStream(session_id=item.session_id, reason=item.reason)
        )
    assert isinstance(item, device_pb2.BrokerMessage)
    return item


class DeviceService(device_pb2_grpc.DeviceServiceServicer):
    """Handlers for cameras; the caller is always the device named by its certificate (I1)."""

    def __init__(self, runtime: Runtime, effects: EffectsApplier) -> None:
        self._rt = runtime
        self._effects = effects
        self._pending: set[asyncio.Task[None]] = set()

    async def RenewCertificate(
        self, request: device_pb2.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.RenewCertificateResponse:
        caller = current_caller()
        key, presigned = await self._rt.run_signing(
            self._rt.devices.check_and_presign, request.csr_pem, caller.identity
        )
        issued = await self._rt.run(self._rt.devices.renew_key, caller.identity, key, presigned)
        # Streams on the old certificate keep running: it stays valid through the grace period.
        return device_pb2.RenewCertificateResponse(
            certificate_chain_pem=issued.chain_pem,
            trust_bundle=trust_bundle_pb(self._rt.trust_bundle),
            not_after=unix(issued.not_after),
            renew_after=unix(issued.renew_after),
        )

    async def ResetOwnership(
        self, request: device_pb2.ResetOwnershipRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.ResetOwnershipResponse:
        caller = current_caller().identity
        reset = await self._rt.run(self._rt.ownership.reset, caller)
        self._effects.apply(reset.effects)
        return device_pb2.ResetOwnershipResponse(
            claim_code=reset.claim_code, sessions_ended=len(reset.sessions_ended)
        )

    async def Attach(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        caller = current_caller()
        device_id = caller.identity.name
        hello = await self._read_hello(context)
        handle = self._rt.presence.attach(
            device_id,
            caller.serial,
            self._chain_pem(caller.certificate),
            authority_key_id(caller.certificate) if caller.certificate else "",
        )
        handle.bundle_version = hello.trust_bundle_version  # heartbeats report changes only
        reader = asyncio.create_task(self._read_loop(context, handle))
        try:
            # Recorded before the greeting: once the camera is told it is attached, every
            # replica sees it online and routes viewers to this stream.
            attached = await self._rt.run(
                self._rt.attachments.attach, device_id, hello.trust_bundle_version
            )
            handle.epoch = attached.epoch
            self._rt.presence.recorded(handle)  # Watch calls waiting for this camera route now
            self._effects.apply(attached.effects)  # an older stream of this device ends
            await self._greet(context, hello, device_id)
            await self._pump(context, handle)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._rt.presence.detach(handle)
            if self._rt.presence.handle(device_id) is None:
                self._rt.relay.on_device_gone(device_id)
            if handle.epoch:
                # Shielded: the handler may be cancelled as the stream ends; the device must
                # show offline at once all the same (unless it re-attached meanwhile).
                await asyncio.shield(
                    self._rt.run(self._rt.attachments.release, device_id, handle.epoch)
                )

    def _chain_pem(self, cert: object) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        if not isinstance(cert, x509.Certificate):
            return ""
        return (
            cert.public_bytes(Encoding.PEM).decode("ascii")
            + self._rt.trust_bundle.issuing_certificates_pem
        )

    async def _read_hello(self, context: grpc.aio.ServicerContext) -> device_pb2.Hello:
        try:
            first = await asyncio.wait_for(
                context.read(), timeout=self._rt.config.attach_hello_timeout_seconds
            )
        except TimeoutError:
            raise InvalidArgument("send a hello as the first Attach message") from None
        if first is grpc.aio.EOF or not first.HasField("hello"):
            raise InvalidArgument("the first Attach message must be a hello")
        hello: device_pb2.Hello = first.hello
        return hello

    async def _greet(
        self, context: grpc.aio.ServicerContext, hello: device_pb2.Hello, device_id: str
    ) -> None:
        await context.write(
            device_pb2.BrokerMessage(
                accepted=device_pb2.AttachAccepted(
                    device_id=device_id,
                    server_time=unix(self._rt.clock.now()),
                    heartbeat_interval_seconds=self._rt.config.heartbeat_interval_seconds,
                )
            )
        )
        bundle = self._rt.trust_bundle
        if hello.trust_bundle_version != bundle.version:
            await context.write(
                device_pb2.BrokerMessage(
                    trust_bundle_update=device_pb2.TrustBundleUpdate(
                        trust_bundle=trust_bundle_pb(bundle)
                    )
                )
            )
        cert = current_caller().certificate
        if cert is not None and self._rt.clock.now() >= renewal_due_at(
            cert.not_valid_before_utc, cert.not_valid_after_utc
        ):
            await context.write(
                device_pb2.BrokerMessage(
                    renew_soon=device_pb2.RenewSoon(not_after=unix(cert.not_valid_after_utc))
                )
            )

    async def _pump(self, context: grpc.aio.ServicerContext, handle: AttachHandle) -> None:
        """Write queued messages to the device until it closes or the broker ends the stream."""
        while True:
            item = await handle.outbox.get()
            if item is CLOSED:
                return
            if isinstance(item, BrokerError):
                await abort_with(context, item)
            await context.write(command_pb(item))

    async def _read_loop(self, context: grpc.aio.ServicerContext, handle: AttachHandle) -> None:
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                self._on_message(handle, message)
        except BrokerError as error:  # e.g. a message that does not decode: end with its status
            handle.end(error)
        except (grpc.aio.AioRpcError, grpc.aio.AbortError, asyncio.InvalidStateError):
            # AbortError: the broker ended the stream (abort_with in _pump) while this read was
            # pending; it must not escape, or Attach's cleanup (detach, release) never runs.
            pass
        finally:
            handle.send(CLOSED)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _remember_bundle(self, device_id: str, version: str) -> None:
        self._background(self._rt.run(self._rt.devices.record_presence, device_id, version))

    async def _renew_lease(self, handle: AttachHandle) -> None:
        """A heartbeat renews the attachment's lease; a fenced-off epoch ends the stream."""
        if not await self._rt.run(self._rt.attachments.renew, handle.device_id, handle.epoch):
            handle.end(Unauthenticated(REPLACED))

    def _on_message(self, handle: AttachHandle, message: device_pb2.DeviceMessage) -> None:
        """Route one message from the camera. Identity is the stream's certificate, never a field (I6)."""
        relay = self._rt.relay
        kind = message.WhichOneof("kind")
        if kind == "media_frame":
            frame = message.media_frame
            if len(frame.ciphertext) <= MAX_FRAME_BYTES:
                relay.on_frame(handle.device_id, frame.session_id, frame.sequence, frame.ciphertext)
        elif kind == "heartbeat":
            beat = message.heartbeat
            handle.send(
                device_pb2.BrokerMessage(
                    heartbeat_ack=device_pb2.HeartbeatAck(sequence=beat.sequence)
                )
            )
            if handle.epoch:
                self._background(self._renew_lease(handle))
            if beat.trust_bundle_version and beat.trust_bundle_version != handle.bundle_version:
                # The camera acknowledges a pushed bundle: remember it for rotation status.
                handle.bundle_version = beat.trust_bundle_version
                self._remember_bundle(handle.device_id, beat.trust_bundle_version)
        elif kind == "stream_accept":
            accept = message.stream_accept
            relay.on_accept(
                handle.device_id,
                accept.session_id,
                Accepted(accept.device_ephemeral_public_key, accept.signature, handle.chain_pem),
            )
        elif kind == "stream_reject":
            relay.on_reject(
                handle.device_id, message.stream_reject.session_id, message.stream_reject.reason
            )
        elif kind == "stream_closed":
            relay.on_closed(
                handle.device_id, message.stream_closed.session_id, message.stream_closed.reason
            )
