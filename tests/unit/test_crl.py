"""CRLs (issue 5, item 2): one per trusted issuing CA, signed by it, listing revoked certificates
until they expire; pkilint's RFC 5280 CRL linter finds no error; the broker serves the same lists.

The linter is assembled exactly as ``pkilint/bin/lint_crl.py`` assembles it for
``lint_crl lint -t CRL -p PKIX``. Findings below ERROR are allowed and listed in WARNINGS_SEEN, so a
change in what pkilint says about our CRLs shows up here.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkilint import loader, pkix, validation
from pkilint.pkix import crl as pkix_crl
from pkilint.pkix import extension, name
from pkilint.validation import ValidationFindingSeverity as Severity

from broker._proto.broker.v1 import admin_pb2, bootstrap_pb2
from broker.accounts.passwords import PasswordHasher
from broker.accounts.users import Accounts
from broker.devices.enrollment import DeviceAuthority
from broker.errors import FailedPrecondition
from broker.identity.spiffe import Identity, operator
from broker.pemfile import read_certificates
from broker.pki.ca import PkiFiles, load_authority
from broker.pki.crl import NEXT_UPDATE, build_crls, crls_pem
from broker.pki.rotation import retire_root, rotate_intermediate, rotate_root
from broker.store.sqlite import SqliteStore
from tests.helpers import (
    OperatorSnapshot,
    bootstrap_stub,
    csr_for,
    enroll_device,
    new_user,
    p256,
    reload_pki,
    renew_device,
)
from tests.unit.conftest import DevPki, make_dev_pki

TD = "camera.local"
PASSWORD = "correct horse battery staple"
# What pkilint says below ERROR about our CRLs (code → why it is acceptable). Kept exact: a new
# finding, or one that goes away, fails test_pkilint_crl_linter_reports_no_error.
WARNINGS_SEEN: dict[str, str] = {}


# -- fixtures: the core objects a broker would use, on a FakeClock ---------------------------------


class Core:
    """DeviceAuthority and Accounts over one store and the current issuing CA."""

    def __init__(self, pki: DevPki, store: SqliteStore) -> None:
        self.pki = pki
        self.store = store
        self.admin: Identity = operator(TD, "admin")
        self.reload()

    def reload(self) -> None:
        """Use the current issuing CA (what the broker does on ReloadPki)."""
        authority = load_authority(self.pki.config, self.pki.clock)
        self.devices = DeviceAuthority(self.pki.config, authority, self.store, self.pki.clock)
        self.accounts = Accounts(
            self.pki.config, authority, self.store, self.pki.clock, PasswordHasher(self.pki.config)
        )

    def enroll(self, device_id: str) -> str:
        token = self.devices.create_enrollment_token(self.admin, device_id).token
        return self.devices.enroll_with_token(csr_for(p256()), token).issued.serial

    def renew(self, device_id: str) -> str:
        from broker.identity.spiffe import device

        return self.devices.renew(device(TD, device_id), csr_for(p256())).serial

    def app(self, username: str) -> tuple[Identity, str]:
        self.accounts.create_account(username, PASSWORD)
        user = self.accounts.authenticate(username, PASSWORD, "127.0.0.1")
        identity = self.accounts.new_app_identity(user.user_id)
        prepared = self.accounts.prepare_app_certificate(identity, csr_for(p256()))
        enrolled = self.accounts.issue_app_certificate(user, prepared, "phone")
        return enrolled.identity, enrolled.issued.serial

    def crls(self) -> list[x509.CertificateRevocationList]:
        return build_crls(self.pki.files, self.store, self.pki.clock)


@pytest.fixture
def core(tmp_path: Path) -> Any:
    pki = make_dev_pki(tmp_path, argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1)
    store = SqliteStore(pki.config.database)
    yield Core(pki, store)
    store.close()


def issuing(files: PkiFiles) -> x509.Certificate:
    return read_certificates(files.issuing_cert)[0]


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def entries(crl: x509.CertificateRevocationList) -> dict[str, x509.RevokedCertificate]:
    return {f"{r.serial_number:x}": r for r in crl}


def reason_of(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def at(unix_seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix_seconds, dt.UTC)


def revoked_at(store: SqliteStore, serial: str) -> int:
    with store.read() as tx:
        record = tx.get_certificate(serial)
    assert record is not None and record.revoked_at is not None
    return record.revoked_at


# -- content and signature ---------------------------------------------------------------------------


def test_crl_is_signed_by_the_issuing_ca_and_lists_revoked_serials_with_date_and_reason(core):
    clock = core.pki.clock
    lost = core.enroll("cam-lost")
    first = core.enroll("cam-stolen")
    second = core.renew("cam-stolen")  # the first is superseded (not revoked) by the renewal
    kept = core.enroll("cam-kept")
    app, app_serial = core.app("anna")
    assert core.crls()[0].get_revoked_certificate_by_serial_number(int(first, 16)) is None

    clock.advance(10)
    core.devices.revoke_device(core.admin, "cam-lost", "key compromise")
    clock.advance(5)
    core.devices.revoke_device(core.admin, "cam-stolen", "stolen")
    core.accounts.revoke_app(app, app.name, app.app_id, "signed out")
    clock.advance(7)

    [crl] = core.crls()
    ca = issuing(core.pki.files)
    assert crl.is_signature_valid(ca.public_key())
    assert crl.issuer == ca.subject
    assert crl.last_update_utc == clock.now().replace(microsecond=0)
    assert crl.next_update_utc == crl.last_update_utc + NEXT_UPDATE
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski(ca)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > 0

    listed = entries(crl)
    assert set(listed) == {lost, first, second, app_serial}  # not the unrevoked cam-kept
    assert kept not in listed
    for serial in listed:
        assert listed[serial].revocation_date_utc == at(revoked_at(core.store, serial))
    assert listed[lost].revocation_date_utc == listed[first].revocation_date_utc - dt.timedelta(
        seconds=5
    )
    assert reason_of(listed[lost]) is x509.ReasonFlags.key_compromise
    assert reason_of(listed[app_serial]) is x509.ReasonFlags.cessation_of_operation
    # A free-text operator reason has no RFC 5280 code: the entry carries no reason (unspecified).
    assert reason_of(listed[first]) is None and reason_of(listed[second]) is None


def test_crl_numbers_increase_and_an_empty_crl_is_still_signed(core):
    [empty] = core.crls()
    assert list(empty) == []
    assert empty.is_signature_valid(issuing(core.pki.files).public_key())
    core.pki.clock.advance(1)
    [later] = core.crls()

    def number(crl: x509.CertificateRevocationList) -> int:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)

    assert number(later) > number(empty)


def test_revoked_certificates_leave_the_crl_once_expired(core):
    clock = core.pki.clock
    device_serial = core.enroll("cam-exp")
    app, app_serial = core.app("ben")
    core.devices.revoke_device(core.admin, "cam-exp", "key compromise")
    core.accounts.revoke_app(app, app.name, app.app_id, "signed out")
    assert set(entries(core.crls()[0])) == {device_serial, app_serial}

    with core.store.read() as tx:
        app_not_after = tx.get_certificate(app_serial).not_after
        device_not_after = tx.get_certificate(device_serial).not_after
    assert app_not_after < device_not_after  # 7-day app certificate, 30-day device certificate

    clock.advance(app_not_after - clock.now().timestamp() - 1)
    assert set(entries(core.crls()[0])) == {device_serial, app_serial}  # one second before
    clock.advance(1)
    assert set(entries(core.crls()[0])) == {device_serial}  # at not_after: expired, dropped
    clock.advance(device_not_after - clock.now().timestamp())
    [crl] = core.crls()
    assert list(crl) == []
    assert crl.is_signature_valid(issuing(core.pki.files).public_key())
    with core.store.read() as tx:  # the store keeps the record; only the CRL forgets it
        assert tx.get_certificate(device_serial).revocation_reason == "key compromise"


# -- one CRL per trusted issuing CA ----------------------------------------------------------------


def test_one_crl_per_trusted_issuing_ca_each_listing_only_its_own_certificates(core):
    clock = core.pki.clock
    files = core.pki.files
    old_ca = issuing(files)
    old_serial = core.enroll("cam-old")
    clock.advance(1)
    rotate_intermediate(core.pki.config, clock)
    core.reload()
    new_ca = issuing(files)
    new_serial = core.enroll("cam-new")
    core.devices.revoke_device(core.admin, "cam-old", "key compromise")
    core.devices.revoke_device(core.admin, "cam-new", "key compromise")

    crls = core.crls()
    assert [c.issuer for c in crls] == [new_ca.subject, old_ca.subject]
    by_ca = dict(zip((new_ca.serial_number, old_ca.serial_number), crls, strict=True))
    assert set(entries(by_ca[new_ca.serial_number])) == {new_serial}
    assert set(entries(by_ca[old_ca.serial_number])) == {old_serial}
    for ca, crl in ((new_ca, crls[0]), (old_ca, crls[1])):
        other = old_ca if ca is new_ca else new_ca
        assert crl.is_signature_valid(ca.public_key())
        assert not crl.is_signature_valid(other.public_key())
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ski(ca)

    # A root rotation adds a third issuing CA; retiring the old root drops the two under it.
    clock.advance(1)
    rotate_root(core.pki.config, clock)
    core.reload()
    assert len(core.crls()) == 3
    retire_root(core.pki.config, core.store, "", force=True)
    [crl] = core.crls()
    assert crl.issuer == issuing(files).subject and list(crl) == []


# -- pkilint ---------------------------------------------------------------------------------------


def _crl_validator() -> Any:
    """The validator ``lint_crl lint -t CRL -p PKIX`` builds (pkilint/bin/lint_crl.py)."""
    return pkix_crl.create_pkix_crl_validator_container(
        [
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [
            pkix_crl.create_issuer_validator_container([]),
            pkix_crl.create_validity_validator_container([]),
            pkix_crl.create_extensions_validator_container([]),
        ],
    )


def lint_crl(crl: x509.CertificateRevocationList) -> list[tuple[Severity, str, str, str]]:
    """(severity, code, node path, message) of every finding."""
    pem = crl.public_bytes(serialization.Encoding.PEM).decode("ascii")
    document = loader.RFC5280CertificateListDocumentLoader().load_pem_document(pem, "crl")
    results: list[validation.ValidationResult] = _crl_validator().validate(document.root)
    return [
        (d.finding.severity, d.finding.code, r.node.path, d.message or "")
        for r in results
        for d in r.finding_descriptions
    ]


def test_pkilint_crl_linter_reports_no_error(core):
    core.enroll("cam-kept")
    core.enroll("cam-a")
    core.enroll("cam-b")
    app, _ = core.app("carol")
    core.devices.revoke_device(core.admin, "cam-a", "key compromise")
    core.devices.revoke_device(core.admin, "cam-b", "stolen")
    core.accounts.revoke_app(app, app.name, app.app_id, "signed out")
    core.pki.clock.advance(1)
    rotate_intermediate(core.pki.config, core.pki.clock)
    core.reload()
    crls = core.crls()
    assert [len(list(c)) for c in crls] == [0, 3]  # an empty CRL and one with every reason kind

    findings = [f for crl in crls for f in lint_crl(crl)]
    errors = [f for f in findings if f[0] <= Severity.ERROR]
    assert errors == []
    below = {code for severity, code, _, _ in findings if severity > Severity.ERROR}
    assert below == set(WARNINGS_SEEN), findings


def test_the_crl_linter_does_find_errors(core):
    """The assembled linter is not vacuous: a CRL without a CRL number or AKI is an ERROR."""
    from cryptography.hazmat.primitives import hashes

    from broker.pemfile import read_private_key

    ca = issuing(core.pki.files)
    now = core.pki.clock.now().replace(microsecond=0)
    bare = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + NEXT_UPDATE)
        .sign(read_private_key(core.pki.files.issuing_key), hashes.SHA256())
    )
    codes = {code for severity, code, _, _ in lint_crl(bare) if severity <= Severity.ERROR}
    assert codes == {"pkix.crl_number_missing", "pkix.authority_key_identifier_missing"}


# -- the broker serves the same lists ----------------------------------------------------------------


def served_crls(broker) -> list[x509.CertificateRevocationList]:
    channel, stub = bootstrap_stub(broker)
    with channel:
        pem = stub.GetCRL(bootstrap_pb2.GetCRLRequest(), timeout=10).crl_pem
    blocks = pem.split("-----END X509 CRL-----")
    return [
        x509.load_pem_x509_crl((block + "-----END X509 CRL-----").encode())
        for block in blocks
        if block.strip()
    ]


def test_bootstrap_get_crl_serves_the_same_entries(broker, operator_channel):
    assert [list(c) for c in served_crls(broker)] == [[]]  # cached now; revocation invalidates it
    kept = enroll_device(broker, operator_channel, "cam-kept")
    gone = enroll_device(broker, operator_channel, "cam-gone")
    renewed = renew_device(broker, gone)
    operator = OperatorSnapshot.of(broker)
    operator.call(
        broker,
        "RevokeDevice",
        admin_pb2.RevokeDeviceRequest(device_id="cam-gone", reason="key compromise"),
    )
    app = new_user(broker, "dora")
    operator.call(
        broker, "RevokeAppInstance", admin_pb2.RevokeAppInstanceRequest(app_id=app.app_id)
    )

    [served] = served_crls(broker)
    store = broker.store()
    try:
        [built] = build_crls(broker.pki.files, store, broker.clock)
    finally:
        store.close()
    assert served.is_signature_valid(issuing(broker.pki.files).public_key())
    assert set(entries(served)) == {gone.serial, renewed.serial, app.serial}
    assert kept.serial not in entries(served)
    for serial, entry in entries(served).items():
        twin = entries(built)[serial]
        assert entry.revocation_date_utc == twin.revocation_date_utc
        assert reason_of(entry) == reason_of(twin)
    assert reason_of(entries(served)[gone.serial]) is x509.ReasonFlags.key_compromise

    # After an intermediate rotation and reload, both issuing CAs' CRLs are served.
    broker.clock.advance(1)
    rotate_intermediate(broker.config, broker.clock)
    reload_pki(broker)
    served = served_crls(broker)
    assert [c.issuer for c in served] == [
        issuing(broker.pki.files).subject,
        read_certificates(next((broker.pki.files.root / "issuing-previous").glob("*.pem")))[
            0
        ].subject,
    ]
    assert [set(entries(c)) for c in served] == [
        set(),
        {gone.serial, renewed.serial, app.serial},
    ]
    assert crls_pem(served).count("BEGIN X509 CRL") == 2


def test_get_crl_is_anonymous_on_bootstrap_and_refused_on_the_factory_listener(broker):
    """GetCRL needs no client certificate; on the factory listener it is mapped to nobody."""
    from tests.helpers import birth_credentials, mtls_channel

    key, cert = birth_credentials(broker, "cam-f001")
    with mtls_channel(broker.factory, broker.pki.ca_pem, key, cert) as channel:
        from broker._proto.broker.v1 import bootstrap_pb2_grpc

        with pytest.raises(grpc.RpcError) as info:
            bootstrap_pb2_grpc.BootstrapStub(channel).GetCRL(
                bootstrap_pb2.GetCRLRequest(), timeout=10
            )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(served_crls(broker)) == 1


def test_retire_root_refuses_while_an_app_holds_an_old_root_certificate(core: Core) -> None:
    app, _ = core.app("anna")
    rotate_root(core.pki.config, core.pki.clock)
    core.reload()
    with pytest.raises(FailedPrecondition) as refused:
        retire_root(core.pki.config, core.store, "", force=False, clock=core.pki.clock)
    assert f"1 app instance(s) still hold a certificate under the old root ({app.app_id})" in (
        refused.value.message
    )
    assert (core.pki.files.root / "root-cross.pem").exists()  # nothing retired

    prepared = core.accounts.prepare_app_certificate(app, csr_for(p256()))
    core.accounts.renew_app(app, prepared)  # now from the new issuing CA
    report = retire_root(core.pki.config, core.store, "", force=False, clock=core.pki.clock)
    assert report.details["old_chain_apps"] == []
    assert not (core.pki.files.root / "root-cross.pem").exists()
