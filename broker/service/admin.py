"""AdminService: operator-only enrollment tokens, revocation and inventory. Never sessions or media."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc
from broker.errors import Unauthenticated
from broker.pki.ca import PkiFiles
from broker.pki.rotation import cross_cert_path
from broker.service.interceptor import current_caller
from broker.service.runtime import Runtime


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    """Thin handlers over the device authority."""

    def __init__(self, runtime: Runtime, reload_pki: Callable[[], tuple[bool, int]]) -> None:
        self._rt = runtime
        self._reload_pki = reload_pki

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
        self._rt.invalidate_crl()
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

    async def RevokeAppInstance(
        self, request: admin_pb2.RevokeAppInstanceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeAppInstanceResponse:
        user_id, ended = await self._rt.run(
            self._rt.accounts.revoke_app_by_id,
            current_caller().identity,
            request.app_id,
            request.reason,
        )
        self._rt.relay.end_many(ended, "app instance revoked")
        self._rt.relay.end_where("app instance revoked", app_id=request.app_id)
        self._rt.invalidate_crl()
        return admin_pb2.RevokeAppInstanceResponse(
            app_id=request.app_id, user_id=user_id, sessions_ended=len(ended)
        )

    async def ReloadPki(
        self, request: admin_pb2.ReloadPkiRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReloadPkiResponse:
        changed, notified = await self._rt.run(self._reload_pki)
        self._rt.invalidate_crl()
        bundle = self._rt.trust_bundle
        return admin_pb2.ReloadPkiResponse(
            trust_bundle_version=bundle.version,
            bundle_changed=changed,
            cameras_notified=notified,
            issuing_ca_serial=self._rt.devices.issuing_serial(),
        )

    async def RotationStatus(
        self, request: admin_pb2.RotationStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RotationStatusResponse:
        statuses = await self._rt.run(self._rt.devices.list_devices)
        version = self._rt.trust_bundle.version
        online = self._rt.presence.online_ids()
        active = [s.record for s in statuses if s.record.state.value == "active"]
        current = [d for d in active if d.trust_bundle_version == version]
        lagging = sorted(d.device_id for d in active if d.trust_bundle_version != version)
        return admin_pb2.RotationStatusResponse(
            trust_bundle_version=version,
            active_devices=len(active),
            online_devices=sum(d.device_id in online for d in active),
            devices_with_current_bundle=len(current),
            online_with_current_bundle=sum(d.device_id in online for d in current),
            lagging_device_ids=lagging[:100],
            root_rotation_pending=cross_cert_path(PkiFiles(self._rt.config.certs_dir)).exists(),
        )

    async def GetCertificate(
        self, request: admin_pb2.GetCertificateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetCertificateResponse:
        record = await self._rt.run(self._rt.devices.certificate, request.serial)
        return admin_pb2.GetCertificateResponse(
            serial=record.serial,
            spiffe_id=record.spiffe_id,
            status=record.status.value,
            not_before=record.not_before,
            not_after=record.not_after,
            superseded_by=record.superseded_by or "",
            revocation_reason=record.revocation_reason or "",
        )
