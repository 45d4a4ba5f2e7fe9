"""Bootstrap service: trust bundle and device enrollment (token or factory birth certificate)."""

from __future__ import annotations

import asyncio

import grpc

from broker._proto.broker.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from broker.accounts.users import check_label
from broker.clock import unix
from broker.devices.enrollment import Enrollment
from broker.errors import InvalidArgument, Unavailable
from broker.identity.spiffe import Identity, Kind, device
from broker.pki.csr import public_key_from_csr
from broker.pki.expired import ExpiredRenewalRequest, RenewalRefused
from broker.service.convert import trust_bundle_pb
from broker.service.interceptor import current_caller
from broker.service.peer import peer_address
from broker.service.runtime import Runtime


class BootstrapService(bootstrap_pb2_grpc.BootstrapServicer):
    """Thin handlers: protobuf in, core call, protobuf out."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def GetTrustBundle(
        self, request: bootstrap_pb2.GetTrustBundleRequest, context: grpc.aio.ServicerContext
    ) -> bootstrap_pb2.GetTrustBundleResponse:
        return bootstrap_pb2.GetTrustBundleResponse(
            trust_bundle=trust_bundle_pb(self._rt.trust_bundle)
        )

    async def EnrollDevice(
        self, request: bootstrap_pb2.EnrollDeviceRequest, context: grpc.aio.ServicerContext
    ) -> bootstrap_pb2.EnrollDeviceResponse:
        caller = current_caller()
        if caller.identity.kind is Kind.BIRTH:
            if request.enrollment_token:
                raise InvalidArgument(
                    "send no enrollment_token when enrolling with a birth certificate"
                )
            key, presigned = await self._rt.run_signing(
                self._rt.devices.check_and_presign,
                request.csr_pem,
                device(self._rt.config.trust_domain, caller.identity.name),
            )
            enrollment = await self._rt.run(
                self._rt.devices.enroll_key_with_birth_certificate,
                key,
                caller.identity.name,
                caller.serial,
                presigned,
            )
        else:
            # The token names the device: read it (one cheap core hop) so the certificate is
            # signed here, off the writer, and the consuming transaction only records it.
            subject: Identity | None = await self._rt.run(
                self._rt.devices.token_subject, request.enrollment_token
            )
            key, presigned = await self._rt.run_signing(
                self._rt.devices.check_and_presign, request.csr_pem, subject
            )
            enrollment = await self._rt.run(
                self._rt.devices.enroll_key_with_token, key, request.enrollment_token, presigned
            )
        return self._response(enrollment)

    async def CreateAccount(
        self, request: bootstrap_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> bootstrap_pb2.CreateAccountResponse:
        user_id = await self._rt.run_slow(
            self._rt.accounts.create_account, request.username, request.password
        )
        return bootstrap_pb2.CreateAccountResponse(user_id=user_id)

    async def EnrollApp(
        self, request: bootstrap_pb2.EnrollAppRequest, context: grpc.aio.ServicerContext
    ) -> bootstrap_pb2.EnrollAppResponse:
        public_key_from_csr(request.csr_pem)  # a bad CSR is not a failed login
        check_label(request.label)
        admission = await self._rt.run(
            self._rt.accounts.admit_login, request.username, peer_address(context, self._rt.clients)
        )
        if admission.wait_seconds > 0:
            # The address's reserved slot (login slowdown): wait here, holding no thread.
            await asyncio.sleep(admission.wait_seconds)
        user = await self._rt.run_slow(self._rt.accounts.verify_login, admission, request.password)
        identity = self._rt.accounts.new_app_identity(user.user_id)
        prepared = await self._rt.run_signing(
            self._rt.accounts.prepare_app_certificate, identity, request.csr_pem
        )
        enrollment = await self._rt.run(
            self._rt.accounts.issue_app_certificate, user, prepared, request.label
        )
        issued = enrollment.issued
        return bootstrap_pb2.EnrollAppResponse(
            user_id=enrollment.identity.name,
            app_id=enrollment.identity.app_id,
            spiffe_id=enrollment.identity.spiffe_id,
            certificate_chain_pem=issued.chain_pem,
            trust_bundle=trust_bundle_pb(self._rt.trust_bundle),
            not_after=unix(issued.not_after),
            renew_after=unix(issued.renew_after),
        )

    async def GetCRL(
        self, request: bootstrap_pb2.GetCRLRequest, context: grpc.aio.ServicerContext
    ) -> bootstrap_pb2.GetCRLResponse:
        return bootstrap_pb2.GetCRLResponse(crl_pem=await self._rt.run(self._rt.current_crl_pem))

    async def RenewExpiredCertificate(
        self,
        request: bootstrap_pb2.RenewExpiredCertificateRequest,
        context: grpc.aio.ServicerContext,
    ) -> bootstrap_pb2.RenewExpiredCertificateResponse:
        renewals = self._rt.expired
        if renewals is None:
            raise Unavailable("renewal after expiry is not available on this broker")
        try:
            checked = await self._rt.run_signing(
                renewals.check,
                ExpiredRenewalRequest(
                    request.certificate_chain_pem,
                    request.csr_pem,
                    request.nonce,
                    request.timestamp,
                    request.signature,
                ),
                self._rt.trust_bundle,
            )
        except RenewalRefused as refused:  # audited on the core thread, then raised
            return await self._rt.run(renewals.deny, refused)
        renewed = await self._rt.run(renewals.renew, checked)
        issued = renewed.issued
        return bootstrap_pb2.RenewExpiredCertificateResponse(
            spiffe_id=renewed.identity.spiffe_id,
            certificate_chain_pem=issued.chain_pem,
            trust_bundle=trust_bundle_pb(self._rt.trust_bundle),
            not_after=unix(issued.not_after),
            renew_after=unix(issued.renew_after),
        )

    def _response(self, enrollment: Enrollment) -> bootstrap_pb2.EnrollDeviceResponse:
        issued = enrollment.issued
        return bootstrap_pb2.EnrollDeviceResponse(
            device_id=enrollment.identity.name,
            spiffe_id=enrollment.identity.spiffe_id,
            certificate_chain_pem=issued.chain_pem,
            trust_bundle=trust_bundle_pb(self._rt.trust_bundle),
            not_after=unix(issued.not_after),
            renew_after=unix(issued.renew_after),
            claim_code=enrollment.claim_code,
        )
