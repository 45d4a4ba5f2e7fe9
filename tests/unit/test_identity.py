"""Identities from certificates (I1): SPIFFE IDs, the one-URI-SAN rule, device-id validation."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.errors import InvalidArgument, Unauthenticated
from broker.identity.spiffe import (
    Identity,
    Kind,
    birth_device_id,
    broker,
    device,
    from_certificate,
    operator,
    parse_spiffe_id,
    replica,
    validate_device_id,
    validate_replica_name,
    validate_trust_domain,
)
from broker.protocol.spiffe_id import MalformedSpiffeId, SpiffeId, single_uri_san

TD = "camera.local"
# The reference pattern from the brief, anchored with \A...\Z so no trailing newline slips in.
SAFE_ID = re.compile(r"\A[a-z0-9][a-z0-9-]{2,63}\Z", re.ASCII)
KEY = ec.generate_private_key(ec.SECP256R1())

valid_ids = st.from_regex(r"\A[a-z0-9][a-z0-9-]{2,63}\Z")
FEW = settings(max_examples=150, deadline=None)


def _cert(
    general_names: list[x509.GeneralName] | None,
    subject_attrs: list[x509.NameAttribute] | None = None,
) -> x509.Certificate:
    subject = x509.Name(subject_attrs or [x509.NameAttribute(NameOID.COMMON_NAME, "probe")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if general_names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    return builder.sign(KEY, hashes.SHA256())


def _uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


# -- SPIFFE IDs: formatting and parsing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "spiffe_id"),
    [
        (Identity(Kind.DEVICE, TD, "cam-0001"), "spiffe://camera.local/device/cam-0001"),
        (
            Identity(Kind.APP, TD, "user-42", "app-7f3a"),
            "spiffe://camera.local/user/user-42/app/app-7f3a",
        ),
        (Identity(Kind.OPERATOR, TD, "admin"), "spiffe://camera.local/operator/admin"),
        (Identity(Kind.OPERATOR, TD, "ops.alice_1"), "spiffe://camera.local/operator/ops.alice_1"),
        (Identity(Kind.BROKER, TD, "broker"), "spiffe://camera.local/broker"),
        (Identity(Kind.REPLICA, TD, "r1"), "spiffe://camera.local/broker/replica/r1"),
        (
            Identity(Kind.REPLICA, TD, "eu-west.r_2"),
            "spiffe://camera.local/broker/replica/eu-west.r_2",
        ),
    ],
)
def test_spiffe_id_round_trip(identity: Identity, spiffe_id: str) -> None:
    assert identity.spiffe_id == spiffe_id
    assert parse_spiffe_id(spiffe_id, TD) == identity
    assert from_certificate(_cert([_uri(spiffe_id)]), TD) == identity


def test_constructors_build_the_same_identities() -> None:
    assert device(TD, "cam-0001") == Identity(Kind.DEVICE, TD, "cam-0001")
    assert operator(TD, "admin") == Identity(Kind.OPERATOR, TD, "admin")
    assert broker(TD) == Identity(Kind.BROKER, TD, "broker")
    assert replica(TD, "r2") == Identity(Kind.REPLICA, TD, "r2")


def test_replica_spiffe_id_is_its_own_kind_with_its_own_accessor() -> None:
    spiffe = SpiffeId.replica(TD, "r3")
    assert str(spiffe) == "spiffe://camera.local/broker/replica/r3"
    assert SpiffeId.parse(str(spiffe)) == spiffe
    assert spiffe.kind == "replica" and spiffe.replica_name == "r3"
    with pytest.raises(MalformedSpiffeId):
        _ = SpiffeId.broker(TD).replica_name
    with pytest.raises(MalformedSpiffeId):
        _ = spiffe.operator_name
    identity = replica(TD, "r3")
    assert identity.replica_name == "r3" and identity.spiffe == spiffe
    # A replica is neither the broker nor an operator: the accessors of other kinds refuse it.
    for accessor in ("device_id", "user_id", "operator_name"):
        with pytest.raises(TypeError):
            getattr(identity, accessor)
    with pytest.raises(TypeError):
        _ = broker(TD).replica_name


@pytest.mark.parametrize("name", ["", "R1", "-r1", "r/1", "r 1", "r" * 64, "r%31"])
def test_invalid_replica_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="replica name"):
        validate_replica_name(name)


def test_anonymous_and_birth_kinds_have_no_spiffe_id() -> None:
    assert Identity(Kind.ANONYMOUS, "", "").spiffe_id == ""
    assert Identity(Kind.BIRTH, TD, "cam-0001").spiffe_id == ""


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://camera.local/",
        "spiffe://camera.local/device",
        "spiffe://camera.local/device/",
        "spiffe://camera.local/device/cam-0001/",
        "spiffe://camera.local/device/cam-0001/extra",
        "spiffe://camera.local/device/cam-0001?x=1",
        "spiffe://camera.local/device/cam-0001#frag",
        "spiffe://camera.local/device/CAM-0001",
        "spiffe://camera.local/device/cam%2d0001",
        "spiffe://camera.local/device/../operator/admin",
        "spiffe://camera.local/device/./cam-0001",
        "spiffe://camera.local//device/cam-0001",
        "spiffe://camera.local/devices/cam-0001",
        "spiffe://camera.local/user/user-42/app",
        "spiffe://camera.local/user/user-42/app/APP",
        "spiffe://camera.local/user/user-42/device/cam-0001",
        "spiffe://camera.local/operator/Admin",
        "spiffe://camera.local/operator/a/b",
        "spiffe://camera.local/broker/",
        "spiffe://camera.local/broker/x",
        "spiffe://camera.local/broker/replica",
        "spiffe://camera.local/broker/replica/",
        "spiffe://camera.local/broker/replica/R1",
        "spiffe://camera.local/broker/replica/r1/x",
        "spiffe://camera.local/broker/replicas/r1",
        "spiffe://camera.local/replica/r1",
    ],
)
def test_malformed_spiffe_ids_in_our_domain_are_refused(uri: str) -> None:
    with pytest.raises(Unauthenticated, match="not a recognised SPIFFE ID"):
        parse_spiffe_id(uri, TD)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://other.local/device/cam-0001",
        "spiffe://camera.local.evil/device/cam-0001",
        "spiffe://evil.camera.local/device/cam-0001",
        "spiffe://camera.loca/device/cam-0001",
        "spiffe://camera.local",
        "spiffe://CAMERA.LOCAL/device/cam-0001",
        "SPIFFE://camera.local/device/cam-0001",
        "https://camera.local/device/cam-0001",
        "spiffe://user@camera.local/device/cam-0001",
        "spiffe://camera.local:443/device/cam-0001",
        " spiffe://camera.local/device/cam-0001",
        "",
    ],
)
def test_foreign_or_lookalike_trust_domain_is_refused(uri: str) -> None:
    with pytest.raises(Unauthenticated, match="not in this broker's trust domain"):
        parse_spiffe_id(uri, TD)


def test_certificate_from_foreign_trust_domain_is_refused() -> None:
    cert = _cert([_uri("spiffe://other.local/device/cam-0001")])
    with pytest.raises(Unauthenticated):
        from_certificate(cert, TD)
    # The same certificate is fine for a broker of that other domain: the domain is the check.
    assert from_certificate(cert, "other.local") == device("other.local", "cam-0001")


# -- exactly one URI SAN ------------------------------------------------------------------------


def test_no_san_extension_is_refused() -> None:
    with pytest.raises(Unauthenticated, match="no subject alternative name"):
        from_certificate(_cert(None), TD)


@pytest.mark.parametrize(
    "names",
    [
        pytest.param([x509.DNSName("cam-0001.camera.local")], id="zero-uri-dns-only"),
        pytest.param(
            [
                _uri("spiffe://camera.local/device/cam-0001"),
                _uri("spiffe://camera.local/device/cam-0002"),
            ],
            id="two-uris",
        ),
        pytest.param(
            [
                _uri("spiffe://camera.local/device/cam-0001"),
                _uri("spiffe://camera.local/device/cam-0001"),
            ],
            id="two-identical-uris",
        ),
        pytest.param(
            [
                _uri("spiffe://camera.local/operator/admin"),
                _uri("spiffe://camera.local/device/cam-0001"),
            ],
            id="operator-and-device",
        ),
    ],
)
def test_anything_but_exactly_one_uri_san_is_refused(names: list[x509.GeneralName]) -> None:
    cert = _cert(names)
    with pytest.raises(Unauthenticated, match="exactly one URI SAN"):
        single_uri_san(cert)
    with pytest.raises(Unauthenticated, match="exactly one URI SAN"):
        from_certificate(cert, TD)


def test_identity_ignores_subject_and_dns_names() -> None:
    """I1: only the URI SAN counts; a subject CN or DNS SAN naming another party changes nothing."""
    cert = _cert(
        [_uri("spiffe://camera.local/device/cam-0001"), x509.DNSName("admin")],
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "spiffe://camera.local/operator/admin"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "cam-9999"),
        ],
    )
    assert from_certificate(cert, TD) == device(TD, "cam-0001")


# -- device ids -------------------------------------------------------------------------------------


@FEW
@given(valid_ids)
def test_valid_device_ids_round_trip(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id
    identity = device(TD, device_id)
    assert parse_spiffe_id(identity.spiffe_id, TD) == identity


# Random text, valid ids, and near misses built from the allowed alphabet plus a few bad characters.
device_id_candidates = st.one_of(
    st.text(max_size=80),
    valid_ids,
    st.text(alphabet="abz09-/.%A_\u00e9\n", max_size=70),
)


@FEW
@given(device_id_candidates)
@example("abc\n")
@example("ab")
@example("a" * 65)
@example("-abc")
def test_accepted_device_ids_are_exactly_the_safe_alphabet(candidate: str) -> None:
    try:
        accepted = validate_device_id(candidate)
    except InvalidArgument as exc:
        assert "a-z, 0-9 and '-'" in exc.message
        assert not SAFE_ID.fullmatch(candidate)
        return
    assert accepted == candidate
    assert SAFE_ID.fullmatch(candidate)
    assert "\n" not in candidate
    assert parse_spiffe_id(device(TD, candidate).spiffe_id, TD).name == candidate


FORBIDDEN = [
    "/",
    ".",
    "%",
    "A",
    "Z",
    "_",
    " ",
    "\n",
    "\x00",
    "\u00e9",  # e-acute
    "\u0131",  # dotless i (upper-cases to I)
    "\u017f",  # long s (case-folds to s)
    "\uff21",  # fullwidth A
    "\uff11",  # fullwidth 1 (a Unicode digit)
    "\u0663",  # Arabic-Indic three (a Unicode digit)
    "\u200b",  # zero-width space
]


@FEW
@given(valid_ids, st.sampled_from(FORBIDDEN), st.integers(min_value=0, max_value=64))
def test_device_ids_with_forbidden_characters_are_refused(base: str, bad: str, at: int) -> None:
    at = min(at, len(base))
    candidate = base[:at] + bad + base[at:]
    with pytest.raises(InvalidArgument):
        validate_device_id(candidate)
    with pytest.raises(InvalidArgument):
        device(TD, candidate)
    # Nor can such an id be smuggled in through a certificate.
    with pytest.raises(Unauthenticated):
        parse_spiffe_id(f"spiffe://{TD}/device/{candidate}", TD)


@FEW
@given(valid_ids)
def test_uppercase_spelling_of_a_valid_id_is_refused(device_id: str) -> None:
    upper = device_id.upper()
    if upper == device_id:  # digits and dashes only
        return
    with pytest.raises(InvalidArgument):
        validate_device_id(upper)


@FEW
@given(st.text(alphabet=st.characters(min_codepoint=0x80), min_size=3, max_size=64))
def test_non_ascii_device_ids_are_refused(candidate: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_device_id(candidate)


@pytest.mark.parametrize(
    "device_id",
    ["", "ab", "a" * 65, "-cam", "cam/1", "cam.1", "../etc", "cam%2f1", "Cam-1", "cam_1", "cam 1"],
)
def test_device_id_examples_refused(device_id: str) -> None:
    with pytest.raises(InvalidArgument, match="device_id must be 3-64 characters"):
        validate_device_id(device_id)


@pytest.mark.parametrize("device_id", ["abc", "0ab", "cam-", "a" * 64, "9" * 3, "cam--1"])
def test_device_id_examples_accepted(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id


def test_operator_names_and_trust_domains_are_validated() -> None:
    with pytest.raises(InvalidArgument):
        operator(TD, "Admin")
    with pytest.raises(InvalidArgument):
        operator(TD, "ops/admin")
    for bad in ("", "Camera.local", "camera..local", "-camera.local", "camera.local.", "cam era"):
        with pytest.raises(InvalidArgument):
            validate_trust_domain(bad)
    assert validate_trust_domain(TD) == TD


# -- birth certificates -------------------------------------------------------------------------------


def _serial_attr(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.SERIAL_NUMBER, value)


def test_birth_device_id_is_the_subject_serial_number() -> None:
    cert = _cert(
        None, [x509.NameAttribute(NameOID.COMMON_NAME, "whatever"), _serial_attr("cam-0001")]
    )
    assert birth_device_id(cert) == "cam-0001"


def test_birth_certificate_without_serial_number_is_refused() -> None:
    with pytest.raises(Unauthenticated, match="exactly one subject serialNumber"):
        birth_device_id(_cert(None))


def test_birth_certificate_with_two_serial_numbers_is_refused() -> None:
    cert = _cert(None, [_serial_attr("cam-0001"), _serial_attr("cam-0002")])
    with pytest.raises(Unauthenticated, match="exactly one subject serialNumber"):
        birth_device_id(cert)


@pytest.mark.parametrize("value", ["CAM-0001", "ab", "cam 0001", "cam.0001", "-cam", "a" * 65])
def test_birth_certificate_with_unsafe_serial_number_is_refused(value: str) -> None:
    cert = _cert(None, [_serial_attr(value)])
    with pytest.raises(InvalidArgument, match="not a valid device_id"):
        birth_device_id(cert)
