"""CSR checks (I2): which keys are accepted (exactly ECDSA P-256 and P-384), and an actionable
InvalidArgument naming the accepted types for everything else."""

from __future__ import annotations

import base64
import re
import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from broker.errors import InvalidArgument
from broker.pki.csr import MAX_CSR_PEM_BYTES, public_key_from_csr, spki_sha256
from tests.helpers import csr_for

ACCEPTED = "the CSR key must be ECDSA P-256 (secp256r1) or P-384 (secp384r1)"

PEM_RE = re.compile(r"-----BEGIN CERTIFICATE REQUEST-----\n(.*?)-----END", re.S)


def _der(csr_pem: str) -> bytes:
    match = PEM_RE.search(csr_pem)
    assert match
    return base64.b64decode(match.group(1))


def _pem(der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"


def _spki(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- accepted -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), id="p256"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="p384"),
    ],
)
def test_accepted_key_types_return_the_csr_public_key(make_key: object) -> None:
    """I2: the public key, and only it, comes back for the two accepted types."""
    key = make_key()  # type: ignore[operator]
    public = public_key_from_csr(csr_for(key))
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert der == _spki(key)
    assert len(spki_sha256(public)) == 64


def test_only_the_key_is_taken_from_a_greedy_csr() -> None:
    """CA:TRUE, extra SANs and EKUs in the CSR are ignored here; the result is just the key (I2)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = csr_for(
        key,
        extensions=[
            x509.BasicConstraints(ca=True, path_length=None),
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://camera.local/broker")]
            ),
        ],
        cn="spiffe://camera.local/operator/admin",
    )
    public = public_key_from_csr(csr)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert spki_sha256(public) == spki_sha256(key.public_key())


# -- refused keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "curve",
    [ec.SECP192R1(), ec.SECP256K1(), ec.SECP224R1(), ec.SECP521R1(), ec.BrainpoolP256R1()],
    ids=lambda c: c.name,
)
def test_refused_curves(curve: ec.EllipticCurve) -> None:
    try:
        key = ec.generate_private_key(curve)
    except Exception:  # not every OpenSSL build still ships every curve
        pytest.skip(f"this OpenSSL build cannot make {curve.name} keys")
    with pytest.raises(InvalidArgument) as info:
        public_key_from_csr(csr_for(key))
    assert info.value.message == f"unsupported key type ECDSA {curve.name}: {ACCEPTED}"


def _csr(key: object, algorithm: hashes.HashAlgorithm | None) -> str:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("make_key", "algorithm", "name"),
    [
        pytest.param(
            lambda: rsa.generate_private_key(65537, 1024), hashes.SHA256(), "RSA-1024", id="rsa1024"
        ),
        pytest.param(
            lambda: rsa.generate_private_key(65537, 2048), hashes.SHA256(), "RSA-2048", id="rsa2048"
        ),
        pytest.param(
            lambda: rsa.generate_private_key(65537, 3072), hashes.SHA256(), "RSA-3072", id="rsa3072"
        ),
        pytest.param(ed25519.Ed25519PrivateKey.generate, None, "Ed25519", id="ed25519"),
        pytest.param(ed448.Ed448PrivateKey.generate, None, "Ed448", id="ed448"),
        pytest.param(
            lambda: dsa.generate_private_key(2048), hashes.SHA256(), "DSA-2048", id="dsa2048"
        ),
    ],
)
def test_other_key_types_are_refused_naming_the_accepted_ones(
    make_key: object, algorithm: hashes.HashAlgorithm | None, name: str
) -> None:
    """RSA (any size) and EdDSA used to be certified, then failed later: Ed25519 in grpc's mutual TLS
    (NO_COMMON_SIGNATURE_ALGORITHMS), RSA at the session handshake. They are refused up front."""
    with pytest.raises(InvalidArgument) as info:
        public_key_from_csr(_csr(make_key(), algorithm))  # type: ignore[operator]
    assert info.value.message == f"unsupported key type {name}: {ACCEPTED}"


def test_key_type_is_refused_even_when_the_signature_is_also_bad() -> None:
    """The key type is judged first: the answer says what to change, not just that it failed."""
    der = bytearray(_der(_csr(ed25519.Ed25519PrivateKey.generate(), None)))
    der[-1] ^= 0x01
    with pytest.raises(InvalidArgument) as info:
        public_key_from_csr(_pem(bytes(der)))
    assert info.value.message == f"unsupported key type Ed25519: {ACCEPTED}"


# -- refused requests -------------------------------------------------------------------------------

SIGNATURE_MESSAGE = "CSR signature does not verify: sign the request with its own key"


def test_tampered_subject_breaks_the_signature() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = _der(csr_for(key, cn="camera-aaaa"))
    tampered = der.replace(b"camera-aaaa", b"camera-bbbb")
    assert tampered != der
    with pytest.raises(InvalidArgument) as info:
        public_key_from_csr(_pem(tampered))
    assert info.value.message == SIGNATURE_MESSAGE


def test_tampered_signature_bytes_are_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    der = bytearray(_der(csr_for(key)))
    # The last byte is the low byte of the DER ECDSA signature's s: flipping it keeps DER valid.
    der[-1] ^= 0x01
    with pytest.raises(InvalidArgument) as info:
        public_key_from_csr(_pem(bytes(der)))
    assert info.value.message == SIGNATURE_MESSAGE


def test_csr_signed_by_another_key_is_refused() -> None:
    """A CSR carrying key A but signed by key B proves nothing about A."""
    holder = ec.generate_private_key(ec.SECP256R1())
    victim = ec.generate_private_key(ec.SECP256R1())
    genuine = x509.load_pem_x509_csr(csr_for(holder, cn="x").encode())
    # Swap the SPKI for the victim's, keep the holder's signature.
    der = _der(csr_for(holder, cn="x"))
    forged = der.replace(_spki(holder), _spki(victim))
    assert forged != der
    assert genuine.is_signature_valid
    with pytest.raises(InvalidArgument) as info:
        public_key_from_csr(_pem(forged))
    assert info.value.message == SIGNATURE_MESSAGE


@pytest.mark.parametrize(
    "garbage",
    [
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n-----END CERTIFICATE REQUEST-----\n",
        _pem(b"\x30\x03\x02\x01\x00"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "csr: \u00e9\u00e8",  # not ASCII
    ],
    ids=["text", "bad-base64", "bad-der", "wrong-label", "non-ascii"],
)
def test_garbage_pem_is_refused(garbage: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        public_key_from_csr(garbage)
    assert "not a PEM-encoded PKCS#10 request" in info.value.message
    assert "BEGIN CERTIFICATE REQUEST" in info.value.message


def test_truncated_csr_is_refused() -> None:
    pem = csr_for(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(InvalidArgument, match="not a PEM-encoded PKCS#10 request"):
        public_key_from_csr(_pem(_der(pem)[:-10]))


def test_oversize_csr_is_refused_before_parsing() -> None:
    valid = csr_for(ec.generate_private_key(ec.SECP256R1()))
    oversize = valid + "\n" * (MAX_CSR_PEM_BYTES + 1 - len(valid))
    assert len(oversize) == MAX_CSR_PEM_BYTES + 1
    with pytest.raises(InvalidArgument) as info:
        public_key_from_csr(oversize)
    assert info.value.message == f"csr_pem is larger than {MAX_CSR_PEM_BYTES} bytes"


def test_large_genuine_csr_is_refused() -> None:
    """A validly signed CSR stuffed with SANs is refused on size alone."""
    names = [x509.DNSName(f"host-{i:05d}.camera.local") for i in range(800)]
    csr = csr_for(
        ec.generate_private_key(ec.SECP256R1()), extensions=[x509.SubjectAlternativeName(names)]
    )
    assert len(csr) > MAX_CSR_PEM_BYTES
    with pytest.raises(InvalidArgument, match="larger than"):
        public_key_from_csr(csr)


def test_empty_csr_is_refused() -> None:
    with pytest.raises(InvalidArgument) as info:
        public_key_from_csr("")
    assert info.value.message == (
        "csr_pem is empty: send a PEM-encoded PKCS#10 certificate request"
    )
