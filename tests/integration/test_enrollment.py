"""Enrollment on bad input (issue 2), through the real bootstrap and factory listeners.

Every negative case asserts the exact status code and what the store holds afterwards: no device
row, no certificate row, and an enrollment token that is still unused when it must not be spent.
"""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc, bootstrap_pb2, bootstrap_pb2_grpc
from broker.client.device import DeviceClient, Endpoints
from broker.pemfile import read_certificates
from broker.store import CertStatus, DeviceState
from tests.helpers import (
    RunningBroker,
    audit_entries,
    birth_credentials,
    bootstrap_stub,
    cert_rows,
    count_rows,
    create_token,
    csr_for,
    device_count,
    device_row,
    device_spiffe,
    enroll,
    enroll_device,
    mtls_channel,
    p256,
    renew_device,
    rpc_error,
    rsa_key,
    self_signed_ca,
    tamper_csr_signature,
    token_used_at,
)

DEVICE = "cam-0001"
OTHER = "cam-0002"


def spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def any_csr(key: object) -> str:
    """A CSR for any key type cryptography can sign with (Ed448 needs no hash, unlike csr_for)."""
    algorithm = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, algorithm)  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def assert_nothing_enrolled(broker: RunningBroker, device_id: str) -> None:
    assert device_row(broker, device_id) is None
    assert cert_rows(broker, device_id) == []


def denied_reasons(broker: RunningBroker) -> list[str]:
    return [str(e.detail.get("reason")) for e in audit_entries(broker, "device.enroll.denied")]


# -- I2: only the public key comes from the CSR ---------------------------------------------------


def test_i2_csr_extensions_and_subject_are_ignored_issued_cert_has_fixed_profile(
    broker, operator_channel
):
    """I2: a CSR asking for CA:TRUE, keyCertSign, codeSigning/serverAuth, a foreign URI SAN, another
    device's URI SAN and a DNS SAN gets the fixed device profile with the server-side identity."""
    token = create_token(operator_channel, DEVICE)
    key = p256()
    csr = csr_for(
        key,
        cn="Evil Root CA",
        extensions=[
            x509.BasicConstraints(ca=True, path_length=None),
            x509.KeyUsage(True, True, True, True, True, True, True, False, False),
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://evil.example/operator/admin"),
                    x509.UniformResourceIdentifier(device_spiffe(OTHER)),
                    x509.DNSName("evil.example"),
                ]
            ),
        ],
    )

    response = enroll(broker, token, csr)

    assert response.device_id == DEVICE
    assert response.spiffe_id == device_spiffe(DEVICE)
    chain = x509.load_pem_x509_certificates(response.certificate_chain_pem.encode())
    leaf, issuing = chain[0], chain[1]
    assert issuing == read_certificates(broker.pki.files.issuing_cert)[0]
    leaf.verify_directly_issued_by(issuing)

    assert spki(leaf.public_key()) == spki(key.public_key())  # the key, and only the key
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    assert {ext.oid for ext in leaf.extensions} == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    }
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value == x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(device_spiffe(DEVICE))]
    assert san.get_values_for_type(x509.DNSName) == []
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 30 * 86400 <= lifetime.total_seconds() <= 30 * 86400 + 3600

    [record] = cert_rows(broker, DEVICE)
    assert record.serial == f"{leaf.serial_number:x}"
    assert record.status is CertStatus.ACTIVE
    assert device_row(broker, DEVICE).state is DeviceState.ACTIVE
    assert device_row(broker, OTHER) is None
    assert token_used_at(broker, token) is not None


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="p384"),
        pytest.param(p256, id="p256"),
    ],
)
def test_i2_accepted_key_types_are_certified_as_sent(broker, operator_channel, make_key):
    """I2: P-256 and P-384 CSRs (the only accepted types, see test_key_types.py) are certified;
    the leaf carries that key."""
    key = make_key()
    response = enroll(broker, create_token(operator_channel, DEVICE), any_csr(key))
    leaf = x509.load_pem_x509_certificate(response.certificate_chain_pem.encode())
    assert spki(leaf.public_key()) == spki(key.public_key())
    assert len(cert_rows(broker, DEVICE)) == 1


# -- bad CSRs: INVALID_ARGUMENT and the token survives --------------------------------------------


def _p192_csr() -> str:
    try:
        key = ec.generate_private_key(ec.SECP192R1())
    except Exception:  # not every OpenSSL build still ships P-192
        pytest.skip("this OpenSSL build cannot make P-192 keys")
    return any_csr(key)


BAD_CSRS = {
    "tampered-signature": lambda: tamper_csr_signature(csr_for(p256())),
    "unparsable-pem": lambda: (
        "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgQ1NS!!\n-----END CERTIFICATE REQUEST-----\n"
    ),
    "not-pem": lambda: "hello, broker",
    "empty": lambda: "",
    "non-ascii": lambda: (
        "-----BEGIN CERTIFICATE REQUEST-----\n\u00e9\n-----END CERTIFICATE REQUEST-----\n"
    ),
    "oversized": lambda: csr_for(p256()) + "A" * 20_000,
    "p192": _p192_csr,
    "secp256k1": lambda: any_csr(ec.generate_private_key(ec.SECP256K1())),
    "rsa1024": lambda: any_csr(rsa_key(1024)),
    "rsa2048": lambda: any_csr(rsa_key(2048)),
    "ed25519": lambda: any_csr(ed25519.Ed25519PrivateKey.generate()),
    "ed448": lambda: any_csr(ed448.Ed448PrivateKey.generate()),
}


@pytest.mark.parametrize("kind", list(BAD_CSRS))
def test_bad_csr_is_invalid_argument_and_token_not_consumed(broker, operator_channel, kind):
    """A CSR with a bad signature, unparsable or empty PEM, or a key that is not ECDSA P-256/P-384:
    INVALID_ARGUMENT, nothing written, and the same token still enrolls (I8)."""
    bad = BAD_CSRS[kind]()
    if kind == "tampered-signature":
        assert not x509.load_pem_x509_csr(bad.encode()).is_signature_valid
    token = create_token(operator_channel, DEVICE)

    error = rpc_error(enroll, broker, token, bad)

    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert token_used_at(broker, token) is None
    assert_nothing_enrolled(broker, DEVICE)

    response = enroll(broker, token, csr_for(p256()))
    assert response.device_id == DEVICE
    assert token_used_at(broker, token) is not None
    assert len(cert_rows(broker, DEVICE)) == 1


def test_missing_token_is_invalid_argument(broker, operator_channel):
    """An enrollment with a good CSR and no token (and no birth certificate) is malformed."""
    error = rpc_error(enroll, broker, "", csr_for(p256()))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert device_count(broker) == 0
    assert count_rows(broker, "certificates", kind="device") == 0


# -- tokens: used, expired, unknown, malformed → PERMISSION_DENIED --------------------------------


def test_i8_used_token_is_permission_denied(broker, operator_channel):
    """I8: a token enrolls once; the second use is refused and issues nothing."""
    token = create_token(operator_channel, DEVICE)
    first = enroll(broker, token, csr_for(p256()))
    used_at = token_used_at(broker, token)

    error = rpc_error(enroll, broker, token, csr_for(p256()))

    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    [record] = cert_rows(broker, DEVICE)
    leaf = x509.load_pem_x509_certificate(first.certificate_chain_pem.encode())
    assert record.serial == f"{leaf.serial_number:x}" and record.status is CertStatus.ACTIVE
    assert token_used_at(broker, token) == used_at
    assert denied_reasons(broker) == ["token already used"]


def test_expired_token_is_permission_denied_and_not_consumed(broker, operator_channel):
    """An expired token (FakeClock moved past its ttl) is refused; nothing is written."""
    token = create_token(operator_channel, DEVICE, ttl=60)
    broker.clock.advance(61)

    error = rpc_error(enroll, broker, token, csr_for(p256()))

    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert token_used_at(broker, token) is None
    assert_nothing_enrolled(broker, DEVICE)
    assert denied_reasons(broker) == ["token expired"]


def test_token_just_inside_ttl_still_enrolls(broker, operator_channel):
    token = create_token(operator_channel, DEVICE, ttl=60)
    broker.clock.advance(59)
    assert enroll(broker, token, csr_for(p256())).device_id == DEVICE


def test_unknown_token_is_permission_denied(broker, operator_channel):
    issued = create_token(operator_channel, DEVICE)
    error = rpc_error(enroll, broker, "bet_" + "A" * 43, csr_for(p256()))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert_nothing_enrolled(broker, DEVICE)
    # no token was used: the one stored is the one issued, and it is still unused
    assert count_rows(broker, "enrollment_tokens") == 1
    assert token_used_at(broker, issued) is None
    assert denied_reasons(broker) == ["unknown token"]


@pytest.mark.parametrize(
    "token",
    ["not-a-token", "bet_" + "x" * 200, "BET_abc", " bet_abc"],
    ids=["no-prefix", "too-long", "case", "space"],
)
def test_malformed_token_is_permission_denied(broker, operator_channel, token):
    real = create_token(operator_channel, DEVICE)
    error = rpc_error(enroll, broker, token, csr_for(p256()))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert_nothing_enrolled(broker, DEVICE)
    assert token_used_at(broker, real) is None
    assert denied_reasons(broker) == ["malformed token"]


def test_denials_never_put_the_token_in_the_audit_log(broker, operator_channel):
    """I11: refusals are audited without the secret itself."""
    token = create_token(operator_channel, DEVICE, ttl=60)
    enroll(broker, token, csr_for(p256()))
    rpc_error(enroll, broker, token, csr_for(p256()))
    entries = audit_entries(broker)
    assert any(e.action == "device.enroll.denied" for e in entries)
    for entry in entries:
        assert token not in json.dumps(entry.detail) and token not in entry.subject + entry.actor


def test_i8_sixteen_concurrent_uses_of_one_token_give_exactly_one_certificate(
    broker, operator_channel
):
    """I8: 16 racing enrollments with one token: one success, 15 PERMISSION_DENIED, one cert."""
    token = create_token(operator_channel, DEVICE)
    csrs = [csr_for(p256()) for _ in range(16)]
    barrier = threading.Barrier(16)
    outcomes: list[object] = [None] * 16
    channels = [bootstrap_stub(broker) for _ in range(16)]
    for channel, _ in channels:  # connect first, so the race is on the RPC, not the handshake
        grpc.channel_ready_future(channel).result(timeout=10)

    def attempt(i: int) -> None:
        stub = channels[i][1]
        barrier.wait()
        try:
            outcomes[i] = stub.EnrollDevice(
                bootstrap_pb2.EnrollDeviceRequest(csr_pem=csrs[i], enrollment_token=token),
                timeout=20,
            )
        except grpc.RpcError as error:
            outcomes[i] = error.code()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for channel, _ in channels:
        channel.close()

    successes = [o for o in outcomes if isinstance(o, bootstrap_pb2.EnrollDeviceResponse)]
    assert len(successes) == 1
    assert outcomes.count(grpc.StatusCode.PERMISSION_DENIED) == 15
    [record] = cert_rows(broker, DEVICE)
    leaf = x509.load_pem_x509_certificate(successes[0].certificate_chain_pem.encode())
    assert record.serial == f"{leaf.serial_number:x}"
    assert device_count(broker) == 1
    assert token_used_at(broker, token) is not None
    assert denied_reasons(broker) == ["token already used"] * 15
    assert len(audit_entries(broker, "device.enrolled")) == 1


# -- a key already bound to another device -------------------------------------------------------


def test_key_bound_to_another_device_is_refused_and_token_not_consumed(broker, operator_channel):
    """A second device presenting cam-0001's public key: PERMISSION_DENIED, no cam-0002 row, and
    the token stays unused (cam-0002 can still enroll with a key of its own)."""
    shared = p256()
    enroll_device(broker, operator_channel, DEVICE, shared)
    token = create_token(operator_channel, OTHER)

    error = rpc_error(enroll, broker, token, csr_for(shared))

    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert_nothing_enrolled(broker, OTHER)
    assert token_used_at(broker, token) is None
    assert len(cert_rows(broker, DEVICE)) == 1
    assert denied_reasons(broker) == ["key bound to another identity"]

    assert enroll(broker, token, csr_for(p256())).device_id == OTHER
    assert token_used_at(broker, token) is not None


def test_key_bound_to_the_operator_is_refused(broker, operator_channel):
    """The offline-issued operator key is bound too: a device cannot get a cert for it."""
    from broker.pemfile import read_private_key

    operator_key = read_private_key(broker.pki.files.operator_key)
    token = create_token(operator_channel, DEVICE)
    error = rpc_error(enroll, broker, token, csr_for(operator_key))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert_nothing_enrolled(broker, DEVICE)
    assert token_used_at(broker, token) is None


def test_renewal_with_a_key_bound_to_another_device_is_refused(broker, operator_channel):
    first = enroll_device(broker, operator_channel, DEVICE)
    second = enroll_device(broker, operator_channel, OTHER)
    error = rpc_error(renew_device, broker, second, first.key)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert [r.serial for r in cert_rows(broker, OTHER)] == [second.serial]
    assert cert_rows(broker, OTHER)[0].status is CertStatus.ACTIVE


# -- device id validation at token creation ------------------------------------------------------


@pytest.mark.parametrize(
    "device_id",
    [
        "",
        "A",
        "CAM-0001",
        "has space",
        "../x",
        "cam/0001",
        "-cam",
        "ab",
        "cam.0001",
        "a" * 65,
        "cam-\u00e9",
    ],
)
def test_token_creation_refuses_invalid_device_ids(broker, operator_channel, device_id):
    """Device ids use a fixed safe alphabet and length; anything else never reaches the store."""
    error = rpc_error(create_token, operator_channel, device_id)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert count_rows(broker, "enrollment_tokens") == 0
    assert audit_entries(broker, "enrollment_token.created") == []


def test_token_creation_accepts_boundary_ids(broker, operator_channel):
    for device_id in ("abc", "0" + "a" * 63):
        create_token(operator_channel, device_id)
    assert count_rows(broker, "enrollment_tokens") == 2


@pytest.mark.parametrize("ttl", [59, 30 * 86400 + 1, 2**32 - 1])
def test_token_creation_refuses_out_of_range_ttl(broker, operator_channel, ttl):
    error = rpc_error(create_token, operator_channel, DEVICE, ttl)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert count_rows(broker, "enrollment_tokens") == 0


# -- factory birth certificates ------------------------------------------------------------------


def _birth_client(broker, tmp_path, name="dev") -> DeviceClient:
    endpoints = Endpoints(broker.bootstrap, broker.main, factory=broker.factory)
    return DeviceClient(tmp_path / name, endpoints, broker.pki.ca_pem)


def test_birth_certificate_enrollment_names_the_device_by_subject_serial_number(broker, tmp_path):
    key_pem, cert_pem = birth_credentials(broker, "cam-b001")
    client = _birth_client(broker, tmp_path)

    state = asyncio.run(client.enroll_with_birth_certificate(cert_pem, key_pem))

    assert state.device_id == "cam-b001"
    assert state.spiffe_id == device_spiffe("cam-b001")
    record = device_row(broker, "cam-b001")
    assert record.state is DeviceState.ACTIVE and record.enrolled_via.startswith("birth:")
    [cert] = cert_rows(broker, "cam-b001")
    leaf = x509.load_pem_x509_certificate(client.chain_path.read_bytes())
    assert cert.serial == f"{leaf.serial_number:x}"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(device_spiffe("cam-b001"))]


@pytest.mark.parametrize(
    "serial_number", ["BAD/../ID", "CAM-B001", "has space", "../etc", "x", "cam.b001"]
)
def test_birth_certificate_with_invalid_device_id_is_invalid_argument(
    broker, tmp_path, serial_number
):
    """A birth certificate whose subject serialNumber is not a valid device id enrolls nothing."""
    key_pem, cert_pem = birth_credentials(broker, serial_number)
    client = _birth_client(broker, tmp_path)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(client.enroll_with_birth_certificate(cert_pem, key_pem))

    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert device_count(broker) == 0
    assert count_rows(broker, "certificates", kind="device") == 0
    assert not client.chain_path.exists()


def test_birth_certificate_enrollment_refuses_a_token_too(broker, operator_channel):
    key_pem, cert_pem = birth_credentials(broker, "cam-b001")
    token = create_token(operator_channel, DEVICE)
    with mtls_channel(broker.factory, broker.pki.ca_pem, key_pem, cert_pem) as channel:
        error = rpc_error(
            bootstrap_pb2_grpc.BootstrapStub(channel).EnrollDevice,
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_for(p256()), enrollment_token=token),
            timeout=10,
        )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert token_used_at(broker, token) is None
    assert_nothing_enrolled(broker, "cam-b001")
    assert_nothing_enrolled(broker, DEVICE)


def test_device_certificate_on_factory_listener_is_refused_at_tls(broker, operator_channel):
    """The factory listener trusts only the factory CA: an issuing-CA device cert fails the handshake."""
    creds = enroll_device(broker, operator_channel, DEVICE)
    with creds.channel(broker, broker.factory) as channel:
        error = rpc_error(
            bootstrap_pb2_grpc.BootstrapStub(channel).EnrollDevice,
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_for(p256())),
            timeout=10,
        )
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert [r.serial for r in cert_rows(broker, DEVICE)] == [creds.serial]


def test_birth_certificate_from_a_foreign_factory_is_refused_at_tls(broker):
    from broker.pki.ca import make_birth_certificate
    from tests.helpers import key_pem, pem

    fake_key, fake_factory = self_signed_ca("Counterfeit Factory CA")
    device_key = p256()
    cert = make_birth_certificate(
        device_key.public_key(), fake_key, fake_factory, "cam-b001", broker.clock.now()
    )
    with mtls_channel(broker.factory, broker.pki.ca_pem, key_pem(device_key), pem(cert)) as channel:
        error = rpc_error(
            bootstrap_pb2_grpc.BootstrapStub(channel).EnrollDevice,
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_for(p256())),
            timeout=10,
        )
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert_nothing_enrolled(broker, "cam-b001")


def test_factory_listener_without_client_certificate_is_refused(broker):
    channel = grpc.secure_channel(broker.factory, grpc.ssl_channel_credentials(broker.pki.ca_pem))
    with channel:
        error = rpc_error(
            bootstrap_pb2_grpc.BootstrapStub(channel).EnrollDevice,
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_for(p256())),
            timeout=10,
        )
    assert error.code() is grpc.StatusCode.UNAVAILABLE


def test_admin_rpcs_are_not_served_on_the_bootstrap_listener(broker):
    """I3: the bootstrap listener has no AdminService at all."""
    channel, _ = bootstrap_stub(broker)
    with channel:
        error = rpc_error(
            admin_pb2_grpc.AdminServiceStub(channel).CreateEnrollmentToken,
            admin_pb2.CreateEnrollmentTokenRequest(device_id=DEVICE),
            timeout=10,
        )
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED
    assert count_rows(broker, "enrollment_tokens") == 0
