"""DeviceService: certificate renewal and the camera's Attach control stream."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from broker._proto.broker.v1 import device_pb2, device_pb2_grpc
from broker.clock import unix
from broker.errors import BrokerError, InvalidArgument
from broker.presence import CLOSED, AttachHandle
from broker.service.convert import trust_bundle_pb
from broker.service.interceptor import abort_with, current_caller
from broker.service.runtime import Runtime


class DeviceService(device_pb2_grpc.DeviceServiceServicer):
    """Handlers for cameras; the caller is always the device named by its certificate (I1)."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def RenewCertificate(
        self, request: device_pb2.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.RenewCertificateResponse:
        caller = current_caller()
        issued = await self._rt.run(self._rt.devices.renew, caller.identity, request.csr_pem)
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
        code, ended = await self._rt.run(self._rt.ownership.reset, current_caller().identity)
        return device_pb2.ResetOwnershipResponse(claim_code=code, sessions_ended=len(ended))

    async def Attach(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        caller = current_caller()
        hello = await self._read_hello(context)
        handle = self._rt.presence.attach(caller.identity.name, caller.serial)
        reader = asyncio.create_task(self._read_loop(context, handle))
        try:
            await self._greet(context, hello, caller.identity.name)
            await self._rt.run(
                self._rt.devices.record_presence, caller.identity.name, hello.trust_bundle_version
            )
            await self._pump(context, handle)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._rt.presence.detach(handle)

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
        if cert is not None and self._renewal_due(
            cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
        ):
            await context.write(
                device_pb2.BrokerMessage(
                    renew_soon=device_pb2.RenewSoon(not_after=unix(cert.not_valid_after_utc))
                )
            )

    def _renewal_due(self, not_before: float, not_after: float) -> bool:
        now = self._rt.clock.now().timestamp()
        return now >= not_before + (not_after - not_before) * 2 / 3

    async def _pump(self, context: grpc.aio.ServicerContext, handle: AttachHandle) -> None:
        """Write queued messages to the device until it closes or the broker ends the stream."""
        while True:
            item = await handle.outbox.get()
            if item is CLOSED:
                return
            if isinstance(item, BrokerError):
                await abort_with(context, item)
            await context.write(item)

    async def _read_loop(self, context: grpc.aio.ServicerContext, handle: AttachHandle) -> None:
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                if message.HasField("heartbeat"):
                    handle.send(
                        device_pb2.BrokerMessage(
                            heartbeat_ack=device_pb2.HeartbeatAck(
                                sequence=message.heartbeat.sequence
                            )
                        )
                    )
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        finally:
            handle.send(CLOSED)
