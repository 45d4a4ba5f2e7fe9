"""End-to-end media encryption between camera and app (I6). No transport here.

Handshake: the camera signs a transcript binding the session (sid, device SPIFFE ID, user_id, the
app certificate thumbprint, both X25519 ephemeral keys) with its certificate key. Both ends derive
per-direction AES-256-GCM keys with HKDF-SHA256 from the X25519 secret, salted with the transcript
hash. Nonces are (direction, sequence number); receivers refuse replayed or reordered frames.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.errors import BrokerError, Unauthenticated
from broker.protocol.keys import ACCEPTED_KEY_TYPES, is_accepted_key
from broker.protocol.spiffe_id import single_uri_san

PROTOCOL = b"camera-broker e2e v1"
DEVICE_TO_APP = 1
APP_TO_DEVICE = 2
KEY_BYTES = 32


class HandshakeError(BrokerError):
    """The camera's hello does not prove what it must; nothing may be decrypted."""


class FrameRejected(BrokerError):
    """A frame failed authentication, or was replayed or reordered."""


@dataclass(frozen=True, slots=True)
class SessionBinding:
    """What both ends agree the session is about (everything the signature covers)."""

    session_id: str
    device_spiffe_id: str
    user_id: str
    cnf_thumbprint: str
    app_ephemeral: bytes
    device_ephemeral: bytes


def transcript(binding: SessionBinding) -> bytes:
    """Unambiguous encoding (length-prefixed fields) of the binding, as signed by the camera."""
    fields = (
        PROTOCOL,
        binding.session_id.encode(),
        binding.device_spiffe_id.encode(),
        binding.user_id.encode(),
        binding.cnf_thumbprint.encode(),
        binding.app_ephemeral,
        binding.device_ephemeral,
    )
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def raw_public(key: x25519.X25519PrivateKey) -> bytes:
    """The raw 32-byte public half of an X25519 key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_transcript(device_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """The camera's signature over a transcript with its certificate key: ECDSA with SHA-256
    (whether the key is P-256 or P-384), DER-encoded (an ASN.1 SEQUENCE of r and s, not raw r||s)."""
    if not isinstance(device_key, ec.EllipticCurvePrivateKey) or not is_accepted_key(
        device_key.public_key()
    ):
        raise HandshakeError(
            f"device key type cannot sign the session handshake: use {ACCEPTED_KEY_TYPES}"
        )
    return device_key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_transcript_signature(cert: x509.Certificate, data: bytes, signature: bytes) -> None:
    """Check the camera's signature with the public key of its certificate: ECDSA with SHA-256,
    DER-encoded, by a P-256 or P-384 key; any other key type is refused (the broker never
    certifies one, see broker.pki.csr)."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not is_accepted_key(key):
        raise HandshakeError(
            f"device key type cannot sign the session handshake: use {ACCEPTED_KEY_TYPES}"
        )
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise HandshakeError("the camera's handshake signature does not verify") from None


def directly_issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether issuer's key signed cert and the names chain (cryptography's check; no path
    building, no validity or constraint checks: callers add the ones they need)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_device_chain(
    chain_pem: str,
    issuing_cas: list[x509.Certificate],
    expected_spiffe_id: str,
    now: dt.datetime,
) -> x509.Certificate:
    """The camera's leaf certificate, if it was issued by one of our issuing CAs to exactly the
    device the app asked for; HandshakeError otherwise.

    cryptography's path verifier refuses URI name constraints ("unsupported name constraint"), so
    this checks the one-level path explicitly with the library's signature verification. The
    issuing CAs come from the trust bundle, which the caller has verified against its pinned roots.
    """
    try:
        certs = x509.load_pem_x509_certificates(chain_pem.encode("ascii"))
    except ValueError:
        raise HandshakeError("device certificate chain is not PEM") from None
    leaf = certs[0]
    candidates = [ca for ca in issuing_cas if ca.subject == leaf.issuer]
    if not candidates:
        raise HandshakeError("device certificate is not from a trusted issuing CA")
    # Issuing CAs may share a name (rotated within the same second): the key decides.
    issuer = next((ca for ca in candidates if directly_issued(leaf, ca)), None)
    if issuer is None:
        raise HandshakeError("device certificate signature does not verify")
    for cert in (leaf, issuer):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise HandshakeError("device certificate chain is expired or not yet valid")
    try:
        basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:  # e.g. a CA certificate presented as the leaf
        raise HandshakeError("device certificate does not have the device profile") from None
    if basic.ca or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise HandshakeError("device certificate does not have the device profile")
    try:
        uri = single_uri_san(leaf)
    except Unauthenticated as error:
        raise HandshakeError(error.message) from None
    if uri != expected_spiffe_id:
        raise HandshakeError(f"stream comes from {uri}, not {expected_spiffe_id}")
    return leaf


def verify_issuing_cas(issuing_pem: str, roots: list[x509.Certificate]) -> list[x509.Certificate]:
    """Issuing CAs from a trust bundle that really chain to one of the pinned roots."""
    trusted = []
    for ca in x509.load_pem_x509_certificates(issuing_pem.encode("ascii")):
        for root in roots:
            try:
                ca.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                trusted.append(ca)
            break
    return trusted


@dataclass(frozen=True, slots=True)
class SessionKeys:
    device_to_app: bytes
    app_to_device: bytes


def derive_keys(shared_secret: bytes, binding: SessionBinding) -> SessionKeys:
    """Per-direction AES-256 keys from the X25519 secret, bound to the transcript."""
    salt = hashlib.sha256(transcript(binding)).digest()

    def expand(label: bytes) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=PROTOCOL + label
        ).derive(shared_secret)

    return SessionKeys(expand(b" device->app"), expand(b" app->device"))


def _nonce(direction: int, sequence: int) -> bytes:
    return struct.pack(">IQ", direction, sequence)


def _aad(session_id: str, sequence: int) -> bytes:
    return session_id.encode() + struct.pack(">Q", sequence)


class Sealer:
    """Encrypts one direction of a session; sequence numbers start at 1 and never repeat."""

    def __init__(self, key: bytes, session_id: str, direction: int) -> None:
        self._aead = AESGCM(key)
        self._session_id = session_id
        self._direction = direction
        self.sequence = 0

    def seal(self, plaintext: bytes) -> tuple[int, bytes]:
        """(sequence, ciphertext) for the next frame."""
        self.sequence += 1
        nonce = _nonce(self._direction, self.sequence)
        return self.sequence, self._aead.encrypt(
            nonce, plaintext, _aad(self._session_id, self.sequence)
        )


class Opener:
    """Decrypts one direction; refuses forged, replayed and reordered frames (gaps are allowed:
    the relay drops the oldest frames for slow watchers)."""

    def __init__(self, key: bytes, session_id: str, direction: int) -> None:
        self._aead = AESGCM(key)
        self._session_id = session_id
        self._direction = direction
        self.last_sequence = 0

    def open(self, sequence: int, ciphertext: bytes) -> bytes:
        if sequence <= self.last_sequence:
            raise FrameRejected(
                f"frame {sequence} replayed or out of order (last {self.last_sequence})"
            )
        try:
            plaintext = self._aead.decrypt(
                _nonce(self._direction, sequence), ciphertext, _aad(self._session_id, sequence)
            )
        except InvalidTag:
            raise FrameRejected("frame does not decrypt under this session's key") from None
        self.last_sequence = sequence
        return plaintext


def device_side(
    device_key: ec.EllipticCurvePrivateKey,
    session_id: str,
    device_spiffe_id: str,
    user_id: str,
    cnf_thumbprint: str,
    app_ephemeral: bytes,
) -> tuple[bytes, bytes, Sealer]:
    """The camera's half: (device ephemeral public key, signature, sealer for device→app frames)."""
    ephemeral = x25519.X25519PrivateKey.generate()
    binding = SessionBinding(
        session_id, device_spiffe_id, user_id, cnf_thumbprint, app_ephemeral, raw_public(ephemeral)
    )
    signature = sign_transcript(device_key, transcript(binding))
    shared = _exchange(ephemeral, app_ephemeral)
    keys = derive_keys(shared, binding)
    return (
        binding.device_ephemeral,
        signature,
        Sealer(keys.device_to_app, session_id, DEVICE_TO_APP),
    )


def _exchange(own: x25519.X25519PrivateKey, peer: x25519.X25519PublicKey | bytes) -> bytes:
    """X25519 shared secret; a malformed or low-order peer key is a failed handshake."""
    try:
        if isinstance(peer, bytes):
            peer = x25519.X25519PublicKey.from_public_bytes(peer)
        return own.exchange(peer)
    except ValueError:
        raise HandshakeError("peer ephemeral key is not a valid X25519 public key") from None


def app_side(
    app_ephemeral: x25519.X25519PrivateKey,
    device_cert: x509.Certificate,
    binding: SessionBinding,
    signature: bytes,
) -> Opener:
    """The app's half: verify the camera's signature, then an opener for device→app frames."""
    if binding.app_ephemeral != raw_public(app_ephemeral):
        raise HandshakeError("the camera answered a different app key")
    verify_transcript_signature(device_cert, transcript(binding), signature)
    try:
        peer = x25519.X25519PublicKey.from_public_bytes(binding.device_ephemeral)
    except ValueError:
        raise HandshakeError("device ephemeral key is not a valid X25519 key") from None
    keys = derive_keys(_exchange(app_ephemeral, peer), binding)
    return Opener(keys.device_to_app, binding.session_id, DEVICE_TO_APP)
