"""AdminService: operator-only enrollment tokens, revocation and inventory. Never sessions or media."""

from __future__ import annotations

import grpc

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc
from broker.errors import Unauthenticated
from broker.service.interceptor import current_caller
from broker.service.runtime import Runtime


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    """Thin handlers over the device authority."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def CreateEnrollmentToken(
        self, request: admin_pb2.CreateEnrollmentTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateEnrollmentTokenResponse:
        token = await self._rt.run(
            self._rt.devices.create_enrollment_token,
            current_caller().identity,
            request.device_id,
            request.ttl_seconds,
        )
        return admin_pb2.CreateEnrollmentTokenResponse(
            device_id=token.device_id, enrollment_token=token.token, expires_at=token.expires_at
        )

    async def RevokeDevice(
        self, request: admin_pb2.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeDeviceResponse:
        serials = await self._rt.run(
            self._rt.devices.revoke_device,
            current_caller().identity,
            request.device_id,
            request.reason,
        )
        self._rt.relay.end_where("device revoked", device_id=request.device_id)
        closed = self._rt.presence.end_device(
            request.device_id, Unauthenticated("device certificate has been revoked")
        )
        return admin_pb2.RevokeDeviceResponse(
            device_id=request.device_id, revoked_serials=serials, attach_streams_closed=closed
        )

    async def ListDevices(
        self, request: admin_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListDevicesResponse:
        statuses = await self._rt.run(self._rt.devices.list_devices)
        return admin_pb2.ListDevicesResponse(
            devices=[
                admin_pb2.DeviceSummary(
                    device_id=s.record.device_id,
                    state=s.record.state.value,
                    online=self._rt.presence.is_online(s.record.device_id),
                    created_at=s.record.created_at,
                    certificate_not_after=s.current_certificate.not_after
                    if s.current_certificate
                    else 0,
                    certificate_serial=s.current_certificate.serial
                    if s.current_certificate
                    else "",
                )
                for s in statuses
            ]
        )
