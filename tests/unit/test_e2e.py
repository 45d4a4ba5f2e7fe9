"""broker.protocol.e2e without any transport (I6): the signed handshake, the device chain check, and frame
sealing with replay/reorder refusal."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.protocol.e2e import (
    APP_TO_DEVICE,
    DEVICE_TO_APP,
    FrameRejected,
    HandshakeError,
    Opener,
    Sealer,
    SessionBinding,
    app_side,
    derive_keys,
    device_side,
    raw_public,
    sign_transcript,
    transcript,
    verify_device_chain,
    verify_transcript_signature,
)
from tests.helpers import impostor_ca, p256, rsa_key, self_signed_ca

DEVICE = "spiffe://camera.local/device/cam-1"
NOW = dt.datetime.now(dt.UTC)  # helpers.self_signed_ca is valid for a day around the real time
CA_KEY, CA_CERT = self_signed_ca("Issuing CA")


def make_cert(
    key: object,
    *,
    issuer_key: object = CA_KEY,
    issuer: x509.Certificate = CA_CERT,
    uris: tuple[str, ...] = (DEVICE,),
    ca: bool = False,
    eku: bool = True,
    not_before: dt.datetime = NOW - dt.timedelta(hours=1),
    not_after: dt.datetime = NOW + dt.timedelta(days=30),
) -> x509.Certificate:
    """A device-profile leaf (or a variation of it) issued by issuer."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]


def chain_pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


DEVICE_KEY = p256()
DEVICE_CERT = make_cert(DEVICE_KEY)
APP_EPH = x25519.X25519PrivateKey.generate()
BINDING = SessionBinding(
    "s-0123", DEVICE, "u-1", "thumb", raw_public(APP_EPH), raw_public(x25519.X25519PrivateKey.generate())
)  # fmt: skip
SIGNATURE = sign_transcript(DEVICE_KEY, transcript(BINDING))


# -- the signed handshake ---------------------------------------------------------------------


def test_handshake_round_trip_gives_both_ends_the_same_frame_key():
    device_eph, signature, sealer = device_side(
        DEVICE_KEY, "s-1", DEVICE, "u-1", "thumb", raw_public(APP_EPH)
    )
    binding = SessionBinding("s-1", DEVICE, "u-1", "thumb", raw_public(APP_EPH), device_eph)
    opener = app_side(APP_EPH, DEVICE_CERT, binding, signature)
    for n in range(1, 4):
        assert opener.open(*sealer.seal(f"frame {n}".encode())) == f"frame {n}".encode()


def test_the_signature_verifies_over_the_unchanged_transcript():
    verify_transcript_signature(DEVICE_CERT, transcript(BINDING), SIGNATURE)


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from([f.name for f in dataclasses.fields(SessionBinding)]), data=st.data())
def test_the_signature_fails_when_any_bound_field_changes(field, data):
    original = getattr(BINDING, field)
    if isinstance(original, bytes):
        new = data.draw(st.binary(max_size=40).filter(lambda b: b != original))
    else:
        new = data.draw(st.text(max_size=40).filter(lambda t: t != original))
    changed = dataclasses.replace(BINDING, **{field: new})
    with pytest.raises(HandshakeError, match="signature does not verify"):
        verify_transcript_signature(DEVICE_CERT, transcript(changed), SIGNATURE)


@settings(max_examples=60, deadline=None)
@given(a=st.text(max_size=8), b=st.text(max_size=8), c=st.text(max_size=8), d=st.text(max_size=8))
def test_the_transcript_cannot_shift_bytes_between_fields(a, b, c, d):
    one = dataclasses.replace(BINDING, session_id=a, device_spiffe_id=b)
    two = dataclasses.replace(BINDING, session_id=c, device_spiffe_id=d)
    assert (transcript(one) == transcript(two)) is ((a, b) == (c, d))


def test_a_signature_by_another_key_fails():
    other = sign_transcript(p256(), transcript(BINDING))
    with pytest.raises(HandshakeError, match="signature does not verify"):
        verify_transcript_signature(DEVICE_CERT, transcript(BINDING), other)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=lambda c: c.name)
def test_p256_and_p384_device_keys_sign_ecdsa_sha256_der(curve: ec.EllipticCurve) -> None:
    """Both accepted key types sign the transcript with ECDSA over SHA-256 (not SHA-384 for P-384),
    DER-encoded (SEQUENCE of r and s, not raw r||s)."""
    key = ec.generate_private_key(curve)
    cert = make_cert(key)
    data = transcript(BINDING)
    signature = sign_transcript(key, data)
    assert signature[0] == 0x30  # DER SEQUENCE
    r, s = decode_dss_signature(signature)
    assert encode_dss_signature(r, s) == signature
    key.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))
    verify_transcript_signature(cert, data, signature)
    with pytest.raises(HandshakeError, match="signature does not verify"):
        verify_transcript_signature(cert, data, SIGNATURE)


def test_a_raw_r_s_signature_is_refused() -> None:
    """JOSE/WebCrypto produce raw r||s; the protocol requires DER, so raw does not verify."""
    r, s = decode_dss_signature(SIGNATURE)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    with pytest.raises(HandshakeError, match="signature does not verify"):
        verify_transcript_signature(DEVICE_CERT, transcript(BINDING), raw)


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda: rsa_key(2048), id="rsa2048"),
        pytest.param(ed25519.Ed25519PrivateKey.generate, id="ed25519"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP521R1()), id="secp521r1"),
    ],
)
def test_a_device_key_that_cannot_sign_the_handshake_is_refused(make_key: object) -> None:
    """The broker certifies only P-256 and P-384 keys; a certificate with any other key (issued
    elsewhere) is refused by the app, and the SDK refuses to sign with one."""
    key = make_key()  # type: ignore[operator]
    cert = make_cert(key)
    expected = (
        "device key type cannot sign the session handshake: "
        "use ECDSA P-256 (secp256r1) or P-384 (secp384r1)"
    )
    with pytest.raises(HandshakeError) as info:
        verify_transcript_signature(cert, transcript(BINDING), SIGNATURE)
    assert info.value.message == expected
    with pytest.raises(HandshakeError) as info:
        sign_transcript(key, transcript(BINDING))  # type: ignore[arg-type]
    assert info.value.message == expected


def test_app_side_refuses_an_answer_to_another_app_key():
    with pytest.raises(HandshakeError, match="a different app key"):
        app_side(x25519.X25519PrivateKey.generate(), DEVICE_CERT, BINDING, SIGNATURE)


def test_app_side_refuses_a_signed_but_invalid_device_key():
    binding = dataclasses.replace(BINDING, device_ephemeral=b"\x01" * 31)
    signature = sign_transcript(DEVICE_KEY, transcript(binding))
    with pytest.raises(HandshakeError, match="not a valid X25519 key"):
        app_side(APP_EPH, DEVICE_CERT, binding, signature)


@pytest.mark.parametrize("bad", [b"\x00" * 32, b"\x01" + b"\x00" * 31, b"\x02" * 31])
def test_a_low_order_or_malformed_app_key_is_a_failed_handshake_on_the_camera(bad: bytes) -> None:
    """I6: an all-zero shared secret is refused as a handshake failure, not an internal error."""
    with pytest.raises(HandshakeError, match="not a valid X25519 public key"):
        device_side(DEVICE_KEY, "s-1", DEVICE, "u-1", "thumb", bad)


def test_a_low_order_signed_device_key_is_a_failed_handshake_in_the_app() -> None:
    binding = dataclasses.replace(BINDING, device_ephemeral=b"\x00" * 32)
    signature = sign_transcript(DEVICE_KEY, transcript(binding))
    with pytest.raises(HandshakeError, match="not a valid X25519 public key"):
        app_side(APP_EPH, DEVICE_CERT, binding, signature)


def test_keys_differ_per_direction_and_per_binding():
    secret = b"\x07" * 32
    keys = derive_keys(secret, BINDING)
    assert keys.device_to_app != keys.app_to_device
    other = derive_keys(secret, dataclasses.replace(BINDING, session_id="s-other"))
    assert other.device_to_app != keys.device_to_app


# -- the device chain ---------------------------------------------------------------------------


def test_a_device_leaf_from_the_issuing_ca_for_the_expected_device_passes():
    leaf = verify_device_chain(chain_pem(DEVICE_CERT, CA_CERT), [CA_CERT], DEVICE, NOW)
    assert leaf == DEVICE_CERT


def test_a_leaf_for_another_device_is_refused():
    other = make_cert(p256(), uris=("spiffe://camera.local/device/cam-2",))
    with pytest.raises(HandshakeError) as refused:
        verify_device_chain(chain_pem(other), [CA_CERT], DEVICE, NOW)
    assert refused.value.message == (
        f"stream comes from spiffe://camera.local/device/cam-2, not {DEVICE}"
    )


def test_a_leaf_with_two_uri_sans_is_refused():
    twice = make_cert(p256(), uris=(DEVICE, "spiffe://camera.local/device/cam-2"))
    with pytest.raises(HandshakeError):
        verify_device_chain(chain_pem(twice), [CA_CERT], DEVICE, NOW)


def test_a_leaf_from_a_foreign_ca_is_refused():
    foreign_key, foreign = self_signed_ca("Someone Else's CA")
    leaf = make_cert(p256(), issuer_key=foreign_key, issuer=foreign)
    with pytest.raises(HandshakeError, match="not from a trusted issuing CA"):
        verify_device_chain(chain_pem(leaf, foreign), [CA_CERT], DEVICE, NOW)


def test_a_leaf_from_an_impostor_ca_with_the_issuing_cas_name_is_refused():
    impostor_key, impostor = impostor_ca(CA_CERT.subject)
    leaf = make_cert(p256(), issuer_key=impostor_key, issuer=impostor)
    with pytest.raises(HandshakeError, match="signature does not verify"):
        verify_device_chain(chain_pem(leaf, impostor), [CA_CERT], DEVICE, NOW)


@pytest.mark.parametrize(
    "when", [NOW + dt.timedelta(days=31), NOW - dt.timedelta(hours=2)], ids=["expired", "not yet"]
)
def test_a_chain_outside_its_validity_is_refused(when):
    with pytest.raises(HandshakeError, match="expired or not yet valid"):
        verify_device_chain(chain_pem(DEVICE_CERT), [CA_CERT], DEVICE, when)


def test_an_expired_leaf_is_refused_even_when_its_ca_is_valid():
    leaf = make_cert(p256(), not_after=NOW - dt.timedelta(seconds=1))
    with pytest.raises(HandshakeError, match="expired or not yet valid"):
        verify_device_chain(chain_pem(leaf), [CA_CERT], DEVICE, NOW)


def test_a_ca_certificate_named_like_the_device_is_refused_as_leaf():
    sub_ca = make_cert(p256(), ca=True)
    with pytest.raises(HandshakeError, match="does not have the device profile"):
        verify_device_chain(chain_pem(sub_ca), [CA_CERT], DEVICE, NOW)


def test_the_issuing_ca_itself_is_refused_as_leaf():
    with pytest.raises(HandshakeError, match="does not have the device profile"):
        verify_device_chain(chain_pem(CA_CERT), [CA_CERT], DEVICE, NOW)


def test_a_leaf_without_client_auth_is_refused():
    no_eku = make_cert(p256(), eku=False)
    with pytest.raises(HandshakeError, match="does not have the device profile"):
        verify_device_chain(chain_pem(no_eku), [CA_CERT], DEVICE, NOW)


@pytest.mark.parametrize("text", ["", "not a certificate"])
def test_a_chain_that_is_not_pem_is_refused(text):
    with pytest.raises(HandshakeError, match="not PEM"):
        verify_device_chain(text, [CA_CERT], DEVICE, NOW)


# -- frames ---------------------------------------------------------------------------------------

KEY = b"\x42" * 32


def pair(session_id: str = "s-1") -> tuple[Sealer, Opener]:
    return Sealer(KEY, session_id, DEVICE_TO_APP), Opener(KEY, session_id, DEVICE_TO_APP)


def test_frames_round_trip_in_order():
    sealer, opener = pair()
    sealed = [sealer.seal(f"f{n}".encode()) for n in range(5)]
    assert [s for s, _ in sealed] == [1, 2, 3, 4, 5]
    assert [opener.open(s, c) for s, c in sealed] == [f"f{n}".encode() for n in range(5)]


@settings(max_examples=50, deadline=None)
@given(bit=st.integers(min_value=0))
def test_any_flipped_ciphertext_bit_is_rejected(bit):
    sealer, opener = pair()
    sequence, ciphertext = sealer.seal(b"some video")
    tampered = bytearray(ciphertext)
    bit %= len(tampered) * 8
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FrameRejected, match="does not decrypt"):
        opener.open(sequence, bytes(tampered))


@pytest.mark.parametrize(
    "opener",
    [
        Opener(KEY, "s-2", DEVICE_TO_APP),  # another session id: the AAD differs
        Opener(KEY, "s-1", APP_TO_DEVICE),  # the other direction: the nonce differs
        Opener(b"\x43" * 32, "s-1", DEVICE_TO_APP),  # another session key
    ],
    ids=["session id", "direction", "key"],
)
def test_a_frame_sealed_for_another_binding_is_rejected(opener):
    sealer, _ = pair("s-1")
    with pytest.raises(FrameRejected, match="does not decrypt"):
        opener.open(*sealer.seal(b"frame"))


def test_a_frame_relabelled_with_another_sequence_number_is_rejected():
    sealer, opener = pair()
    _, ciphertext = sealer.seal(b"frame")
    with pytest.raises(FrameRejected, match="does not decrypt"):
        opener.open(2, ciphertext)


def test_a_replayed_frame_is_rejected():
    sealer, opener = pair()
    frame = sealer.seal(b"frame")
    opener.open(*frame)
    with pytest.raises(FrameRejected, match="replayed or out of order"):
        opener.open(*frame)


def test_a_reordered_frame_is_rejected_and_does_not_move_the_window():
    sealer, opener = pair()
    first, second = sealer.seal(b"one"), sealer.seal(b"two")
    opener.open(*second)
    with pytest.raises(FrameRejected, match="replayed or out of order"):
        opener.open(*first)
    assert opener.last_sequence == 2
    assert opener.open(*sealer.seal(b"three")) == b"three"


def test_gaps_are_accepted():
    sealer, opener = pair()
    sealed = [sealer.seal(f"f{n}".encode()) for n in range(1, 11)]
    kept = [sealed[0], sealed[3], sealed[9]]  # the relay dropped the others
    assert [opener.open(s, c) for s, c in kept] == [b"f1", b"f4", b"f10"]


def test_a_forged_frame_with_a_high_sequence_number_does_not_block_later_frames():
    sealer, opener = pair()
    with pytest.raises(FrameRejected):
        opener.open(10**9, b"\x00" * 32)
    assert opener.last_sequence == 0
    assert opener.open(*sealer.seal(b"genuine")) == b"genuine"


def test_sequence_zero_is_never_accepted():
    _, opener = pair()
    with pytest.raises(FrameRejected, match="replayed or out of order"):
        opener.open(0, b"\x00" * 32)


def test_two_ec_keys_give_distinct_signatures_over_the_same_transcript():
    # ECDSA is randomised; verification does not depend on a deterministic signature.
    again = sign_transcript(DEVICE_KEY, transcript(BINDING))
    assert again != SIGNATURE
    verify_transcript_signature(DEVICE_CERT, transcript(BINDING), again)
    assert isinstance(DEVICE_KEY, ec.EllipticCurvePrivateKey)
