"""Operator SDK: talks to a running broker's AdminService with the operator certificate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc
from broker.client.channels import sync_mtls_channel
from broker.pki.ca import PkiFiles


@dataclass(frozen=True, slots=True)
class OperatorCredentials:
    ca_pem: bytes
    key_pem: bytes
    chain_pem: bytes

    @classmethod
    def from_certs_dir(cls, certs_dir: Path) -> OperatorCredentials:
        files = PkiFiles(certs_dir)
        return cls(
            files.ca_bundle.read_bytes(),
            files.operator_key.read_bytes(),
            files.operator_chain.read_bytes(),
        )


class AdminClient:
    """Blocking client for AdminService (used by the CLI and make targets)."""

    def __init__(self, target: str, creds: OperatorCredentials, timeout: float = 10.0) -> None:
        """target: the main listener; several replicas may be given comma-separated."""
        self._channel = sync_mtls_channel(target, creds.ca_pem, creds.key_pem, creds.chain_pem)
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._timeout = timeout

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def create_enrollment_token(
        self, device_id: str, ttl_seconds: int = 0
    ) -> admin_pb2.CreateEnrollmentTokenResponse:
        request = admin_pb2.CreateEnrollmentTokenRequest(
            device_id=device_id, ttl_seconds=ttl_seconds
        )
        response: admin_pb2.CreateEnrollmentTokenResponse = self._stub.CreateEnrollmentToken(
            request, timeout=self._timeout
        )
        return response

    def revoke_device(self, device_id: str, reason: str = "") -> admin_pb2.RevokeDeviceResponse:
        request = admin_pb2.RevokeDeviceRequest(device_id=device_id, reason=reason)
        response: admin_pb2.RevokeDeviceResponse = self._stub.RevokeDevice(
            request, timeout=self._timeout
        )
        return response

    def list_devices(self) -> list[admin_pb2.DeviceSummary]:
        response = self._stub.ListDevices(admin_pb2.ListDevicesRequest(), timeout=self._timeout)
        return list(response.devices)

    def revoke_app(self, app_id: str, reason: str = "") -> admin_pb2.RevokeAppInstanceResponse:
        request = admin_pb2.RevokeAppInstanceRequest(app_id=app_id, reason=reason)
        response: admin_pb2.RevokeAppInstanceResponse = self._stub.RevokeAppInstance(
            request, timeout=self._timeout
        )
        return response

    def reload_pki(self) -> admin_pb2.ReloadPkiResponse:
        response: admin_pb2.ReloadPkiResponse = self._stub.ReloadPki(
            admin_pb2.ReloadPkiRequest(), timeout=self._timeout
        )
        return response

    def rotation_status(self) -> admin_pb2.RotationStatusResponse:
        response: admin_pb2.RotationStatusResponse = self._stub.RotationStatus(
            admin_pb2.RotationStatusRequest(), timeout=self._timeout
        )
        return response

    def get_certificate(self, serial: str) -> admin_pb2.GetCertificateResponse:
        response: admin_pb2.GetCertificateResponse = self._stub.GetCertificate(
            admin_pb2.GetCertificateRequest(serial=serial), timeout=self._timeout
        )
        return response

    def fleet_audit(
        self,
        since_seconds: int = 0,
        *,
        expiring_within_seconds: int = 0,
        fanout_min_devices: int = 0,
        fanout_window_seconds: int = 0,
    ) -> admin_pb2.FleetAuditResponse:
        """Suspicious patterns over the last since_seconds (0 = 7 days); read-only."""
        request = admin_pb2.FleetAuditRequest(
            since_seconds=since_seconds,
            expiring_within_seconds=expiring_within_seconds,
            fanout_min_devices=fanout_min_devices,
            fanout_window_seconds=fanout_window_seconds,
        )
        response: admin_pb2.FleetAuditResponse = self._stub.FleetAudit(
            request, timeout=self._timeout
        )
        return response
