"""AdminService: operator-only enrollment tokens, revocation and inventory. Never sessions or media."""

from __future__ import annotations

import grpc

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc
from broker.audit.fleet import fleet_audit
from broker.clock import unix
from broker.pki.ca import PkiFiles
from broker.pki.rotation import bundle_adoption
from broker.service.effects import EffectsApplier
from broker.service.fleet import identifier, report_pb, thresholds_from
from broker.service.interceptor import current_caller
from broker.service.runtime import Runtime


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    """Thin handlers over the device authority."""

    def __init__(self, runtime: Runtime, effects: EffectsApplier) -> None:
        self._rt = runtime
        self._effects = effects

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
        revoked = await self._rt.run(
            self._rt.devices.revoke_device,
            current_caller().identity,
            request.device_id,
            request.reason,
        )
        applied = self._effects.apply(revoked.effects)
        return admin_pb2.RevokeDeviceResponse(
            device_id=request.device_id,
            revoked_serials=revoked.serials,
            attach_streams_closed=applied.attach_streams_closed,
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
                    online=s.online,
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
        revoked = await self._rt.run(
            self._rt.accounts.revoke_app_by_id,
            current_caller().identity,
            request.app_id,
            request.reason,
        )
        self._effects.apply(revoked.effects)
        return admin_pb2.RevokeAppInstanceResponse(
            app_id=request.app_id,
            user_id=revoked.user_id,
            sessions_ended=len(revoked.sessions_ended),
        )

    async def ReloadPki(
        self, request: admin_pb2.ReloadPkiRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReloadPkiResponse:
        # Read on the core thread; applied here, on the event loop (bundle push, stale streams).
        reloaded = await self._rt.run(self._rt.pki.reload, self._rt.trust_bundle.version)
        applied = self._effects.apply(reloaded.effects)
        return admin_pb2.ReloadPkiResponse(
            trust_bundle_version=reloaded.bundle.version,
            bundle_changed=reloaded.effects.trust is not None and reloaded.effects.trust.changed,
            cameras_notified=applied.cameras_notified,
            issuing_ca_serial=reloaded.issuing_serial,
        )

    async def RotationStatus(
        self, request: admin_pb2.RotationStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RotationStatusResponse:
        status = await self._rt.run(
            bundle_adoption,
            PkiFiles(self._rt.config.certs_dir),
            self._rt.store,
            self._rt.trust_bundle.version,
            unix(self._rt.clock.now()),
        )
        return admin_pb2.RotationStatusResponse(
            trust_bundle_version=self._rt.trust_bundle.version,
            active_devices=status.active,
            online_devices=status.online,
            devices_with_current_bundle=status.current,
            online_with_current_bundle=status.online_current,
            lagging_device_ids=status.lagging[:100],
            root_rotation_pending=status.root_rotation_pending,
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

    async def FleetAudit(
        self, request: admin_pb2.FleetAuditRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.FleetAuditResponse:
        report = await self._rt.run(
            fleet_audit,
            self._rt.store,
            self._rt.clock,
            thresholds_from(request),
            identifier(self._rt.config.trust_domain),
        )
        return report_pb(report)
