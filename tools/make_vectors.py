"""Write docs/test-vectors.json: the wire protocol's test vectors (docs/PROTOCOL.md).

Deterministic: every private key is a fixed constant below, every input is fixed, "now" is fixed,
and every ECDSA signature (certificates, the handshake, session tokens) is made with RFC 6979
deterministic nonces, so running this twice gives the same file byte for byte. Values come from the
project's own code (broker.protocol.e2e, broker.protocol.tokens) wherever it has a function for them;
the invalid token variants are built by hand with cryptography and PyJWT.

    .venv/bin/python tools/make_vectors.py           # (re)write docs/test-vectors.json
    .venv/bin/python tools/make_vectors.py --check   # exit 1 if the committed file is stale

The keys here are published test keys: never use them for anything else.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.protocol import e2e, renewal, tokens

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "test-vectors.json"

# 2099-01-01T00:00:00Z. In the future on purpose: verifiers that also consult the wall clock for
# "exp" (PyJWT does, as do most JOSE libraries) give the same verdicts as at the injected "now".
NOW = 4_070_908_800
TRUST_DOMAIN = "camera.local"
ISSUER = f"spiffe://{TRUST_DOMAIN}/broker"
DEVICE_ID = "cam-vectors-1"
DEVICE_SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/device/{DEVICE_ID}"
OTHER_DEVICE_SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/device/cam-vectors-2"
USER_ID = "u-0123456789abcdef"
APP_ID = "a-fedcba9876543210"
APP_SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/user/{USER_ID}/app/{APP_ID}"
SESSION_ID = "s-00112233445566778899aabb"

# Fixed private keys (scalars as hex). Test keys only.
ROOT_CA_KEY = "2525da744cd8c4181b90554efec20ea14c370d139493bc398f2029528542f1b5"
ISSUING_CA_KEY = "660fec2ec908f976f4c9ce4e55ff2441d68316ca8a1163d5da1f700dc4cdfe52"
DEVICE_P256_KEY = "a9a3fca3f5c71aefd12a105d15b1a6c7b91332802487c6eb958799058b9a2d95"
DEVICE_P384_KEY = (
    "fc198a6d4acd2f43df71e15ccec3ce1f325f9afa18f625d7a6da18c0c4c3a499"
    "4fb0825e6dfaa5688c4d2ac8dfec9126"
)
APP_P256_KEY = "fd7c83a16a0b63d9066306f1b42dae85e269bf8c317c9cd41f513ebaeac45ce7"
JWS_SIGNER_KEY = "15332fea1df1e912c659549b1a14df4cecb789e95bff98e1c9d19ced413a5cf8"
# Signs tokens that must fail: a key nobody publishes, and a published key not pinned to ES256.
JWS_OTHER_KEY = "81d3984b9b3b91d3f13c16fa0dc28ad997470ecc440763f72dcd9a87dcaf286d"
JWS_UNPINNED_KEY = "d5f220a848c98aa222fea7ae5369104ce4542476d4ef26f7b07dce6ce0956ea7"
APP_X25519_PRIVATE = "ebf21ef3dfebfc4439a0b5bd32ab407bb4cefc7602f1fe4123698053496a3c0a"
DEVICE_X25519_PRIVATE = "87fb126afac6f5238a93d43ce2fa2c349fc2814924a4df1b414a03dd366a0f58"

# The camera's new key in the renew-after-expiry vector (its CSR), and the request's nonce.
RENEW_NEW_KEY = "3b8fd7a4c1e2f60958a7b6c5d4e3f2a1908f7e6d5c4b3a29180f7e6d5c4b3a2f"
RENEW_NONCE = bytes(range(0xA0, 0xC0))

DETERMINISTIC_ECDSA = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)


# -- helpers ---------------------------------------------------------------------------------------
def ec_key(scalar_hex: str, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int(scalar_hex, 16), curve)


def x25519_key(private_hex: str) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))


def at(offset_seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(NOW + offset_seconds, dt.UTC)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def spki_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def der_to_raw(signature: bytes, size: int) -> bytes:
    """DER Ecdsa-Sig-Value to the fixed-size r||s form JOSE and WebCrypto use."""
    r, s = decode_dss_signature(signature)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_pki() -> dict[str, x509.Certificate]:
    """Root and issuing CA, and leaves with the broker's profiles (broker.pki.ca), fixed serials."""
    root_key = ec_key(ROOT_CA_KEY, ec.SECP256R1())
    issuing_key = ec_key(ISSUING_CA_KEY, ec.SECP256R1())
    root_name = _name("Vector Root CA")
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(0x1001)
        .not_valid_before(at(-300))
        .not_valid_after(at(3650 * 86400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    issuing = (
        x509.CertificateBuilder()
        .subject_name(_name("Vector Issuing CA"))
        .issuer_name(root_name)
        .public_key(issuing_key.public_key())
        .serial_number(0x1002)
        .not_valid_before(at(-300))
        .not_valid_after(at(1825 * 86400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(TRUST_DOMAIN)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(issuing_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256(), ecdsa_deterministic=True)
    )

    def leaf(
        key: ec.EllipticCurvePrivateKey, common_name: str, uri: str, serial: int, days: int
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(issuing.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(at(-300))
            .not_valid_after(at(days * 86400))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuing_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
            )
            .sign(issuing_key, hashes.SHA256(), ecdsa_deterministic=True)
        )

    return {
        "root": root,
        "issuing": issuing,
        "device_p256": leaf(
            ec_key(DEVICE_P256_KEY, ec.SECP256R1()), DEVICE_ID, DEVICE_SPIFFE_ID, 0x2001, 30
        ),
        "device_p384": leaf(
            ec_key(DEVICE_P384_KEY, ec.SECP384R1()), DEVICE_ID, DEVICE_SPIFFE_ID, 0x2002, 30
        ),
        "app": leaf(ec_key(APP_P256_KEY, ec.SECP256R1()), USER_ID, APP_SPIFFE_ID, 0x3001, 7),
    }


# -- end-to-end handshake and frames ---------------------------------------------------------------
def nonce(direction: int, sequence: int) -> bytes:
    """12 bytes: direction as uint32 big-endian, then the sequence number as uint64 big-endian."""
    return struct.pack(">IQ", direction, sequence)


def aad(session_id: str, sequence: int) -> bytes:
    """UTF-8 session id, then the sequence number as uint64 big-endian (no length prefix)."""
    return session_id.encode("utf-8") + struct.pack(">Q", sequence)


def frame_vector(key: bytes, direction: int, sequence: int, plaintext: bytes) -> dict[str, Any]:
    sealed = AESGCM(key).encrypt(nonce(direction, sequence), plaintext, aad(SESSION_ID, sequence))
    return {
        "direction": direction,
        "sequence": sequence,
        "nonce_hex": nonce(direction, sequence).hex(),
        "aad_hex": aad(SESSION_ID, sequence).hex(),
        "plaintext_hex": plaintext.hex(),
        "ciphertext_hex": sealed.hex(),
        "tag_hex": sealed[-16:].hex(),
    }


def sealed_by_project(key: bytes, direction: int, plaintexts: list[bytes]) -> list[dict[str, Any]]:
    """Frames as broker.protocol.e2e.Sealer makes them (sequence 1, 2, ...), checked against the
    spec's nonce and AAD layout."""
    sealer = e2e.Sealer(key, SESSION_ID, direction)
    frames = []
    for plaintext in plaintexts:
        sequence, ciphertext = sealer.seal(plaintext)
        vector = frame_vector(key, direction, sequence, plaintext)
        if vector["ciphertext_hex"] != ciphertext.hex():
            raise SystemExit("Sealer output differs from the documented nonce/AAD layout")
        frames.append(vector)
    return frames


def transcript_fields(binding: e2e.SessionBinding) -> list[dict[str, Any]]:
    values = [
        ("label", e2e.PROTOCOL),
        ("session_id", binding.session_id.encode("utf-8")),
        ("device_spiffe_id", binding.device_spiffe_id.encode("utf-8")),
        ("user_id", binding.user_id.encode("utf-8")),
        ("cnf_thumbprint", binding.cnf_thumbprint.encode("utf-8")),
        ("app_ephemeral_public_key", binding.app_ephemeral),
        ("device_ephemeral_public_key", binding.device_ephemeral),
    ]
    return [
        {
            "field": name,
            "length": len(value),
            "length_prefix_hex": struct.pack(">I", len(value)).hex(),
            "value_hex": value.hex(),
        }
        for name, value in values
    ]


def sign_checked(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, data: bytes) -> bytes:
    signature = key.sign(data, DETERMINISTIC_ECDSA)
    e2e.verify_transcript_signature(cert, data, signature)  # the app's check must accept it
    return signature


def e2e_vectors(pki: dict[str, x509.Certificate]) -> dict[str, Any]:
    app_cert_der = pki["app"].public_bytes(serialization.Encoding.DER)
    cnf = tokens.cert_thumbprint(app_cert_der)
    app_eph = x25519_key(APP_X25519_PRIVATE)
    device_eph = x25519_key(DEVICE_X25519_PRIVATE)
    binding = e2e.SessionBinding(
        SESSION_ID,
        DEVICE_SPIFFE_ID,
        USER_ID,
        cnf,
        e2e.raw_public(app_eph),
        e2e.raw_public(device_eph),
    )
    data = e2e.transcript(binding)
    device_p256 = ec_key(DEVICE_P256_KEY, ec.SECP256R1())
    device_p384 = ec_key(DEVICE_P384_KEY, ec.SECP384R1())
    signature = sign_checked(device_p256, pki["device_p256"], data)
    signature_p384 = sign_checked(device_p384, pki["device_p384"], data)
    shared = device_eph.exchange(x25519.X25519PublicKey.from_public_bytes(binding.app_ephemeral))
    if shared != app_eph.exchange(
        x25519.X25519PublicKey.from_public_bytes(binding.device_ephemeral)
    ):
        raise SystemExit("X25519 is not symmetric?")
    keys = e2e.derive_keys(shared, binding)
    d2a, a2d = e2e.DEVICE_TO_APP, e2e.APP_TO_DEVICE
    device_frames = sealed_by_project(
        keys.device_to_app,
        d2a,
        [b"frame 1 from the camera", bytes(range(32)), b""],
    )
    gap = frame_vector(keys.device_to_app, d2a, 7, b"frame 7 (4..6 were dropped by the relay)")
    app_frames = sealed_by_project(keys.app_to_device, a2d, [b"frame 1 from the app"])

    other_user = e2e.SessionBinding(
        SESSION_ID, DEVICE_SPIFFE_ID, "u-aaaaaaaaaaaaaaaa", cnf, binding.app_ephemeral,
        binding.device_ephemeral,
    )  # fmt: skip
    tampered = bytearray(bytes.fromhex(device_frames[0]["ciphertext_hex"]))
    tampered[-1] ^= 0x01
    f1, f2 = device_frames[0], device_frames[1]

    def step(frame: dict[str, Any], verdict: str, reason: str = "") -> dict[str, Any]:
        return {
            "sequence": frame["sequence"],
            "ciphertext_hex": frame["ciphertext_hex"],
            "verdict": verdict,
            "reason": reason,
        }

    return {
        "protocol_label": e2e.PROTOCOL.decode("ascii"),
        "app_certificate_der_sha256_hex": hashlib.sha256(app_cert_der).hexdigest(),
        "binding": {
            "session_id": binding.session_id,
            "device_spiffe_id": binding.device_spiffe_id,
            "user_id": binding.user_id,
            "cnf_thumbprint": binding.cnf_thumbprint,
            "app_ephemeral_public_key_hex": binding.app_ephemeral.hex(),
            "device_ephemeral_public_key_hex": binding.device_ephemeral.hex(),
        },
        "app_ephemeral_private_key_hex": APP_X25519_PRIVATE,
        "device_ephemeral_private_key_hex": DEVICE_X25519_PRIVATE,
        "transcript_fields": transcript_fields(binding),
        "transcript_hex": data.hex(),
        "transcript_sha256_hex": hashlib.sha256(data).hexdigest(),
        "signature": {
            "algorithm": "ECDSA P-256 with SHA-256 over the transcript bytes, DER Ecdsa-Sig-Value",
            "device_key": "pki.device_p256_private_key_pkcs8_pem",
            "der_hex": signature.hex(),
            "raw_r_s_hex": der_to_raw(signature, 32).hex(),
        },
        "signature_p384": {
            "algorithm": "ECDSA P-384 with SHA-256 over the transcript bytes, DER Ecdsa-Sig-Value",
            "device_key": "pki.device_p384_private_key_pkcs8_pem",
            "der_hex": signature_p384.hex(),
            "raw_r_s_hex": der_to_raw(signature_p384, 48).hex(),
        },
        "x25519_shared_secret_hex": shared.hex(),
        "hkdf": {
            "hash": "SHA-256",
            "ikm": "x25519_shared_secret_hex",
            "salt_hex": hashlib.sha256(data).hexdigest(),
            "info_device_to_app": (e2e.PROTOCOL + b" device->app").decode("ascii"),
            "info_device_to_app_hex": (e2e.PROTOCOL + b" device->app").hex(),
            "info_app_to_device": (e2e.PROTOCOL + b" app->device").decode("ascii"),
            "info_app_to_device_hex": (e2e.PROTOCOL + b" app->device").hex(),
            "length": e2e.KEY_BYTES,
            "key_device_to_app_hex": keys.device_to_app.hex(),
            "key_app_to_device_hex": keys.app_to_device.hex(),
        },
        "frames": [*device_frames, gap, *app_frames],
        "negative": {
            "signatures": [
                {
                    "name": "signature_over_other_user",
                    "description": "the valid signature checked against a transcript whose "
                    "user_id differs (the app must build the transcript from its own values)",
                    "transcript_hex": e2e.transcript(other_user).hex(),
                    "signature_der_hex": signature.hex(),
                    "certificate": "pki.device_p256_certificate_pem",
                    "verdict": "reject",
                    "reason": "bad_signature",
                },
                {
                    "name": "raw_r_s_instead_of_der",
                    "description": "the right signature sent as raw r||s (WebCrypto/JOSE form)",
                    "transcript_hex": data.hex(),
                    "signature_der_hex": der_to_raw(signature, 32).hex(),
                    "certificate": "pki.device_p256_certificate_pem",
                    "verdict": "reject",
                    "reason": "bad_signature",
                },
                {
                    "name": "p384_signature_checked_with_p256_certificate",
                    "description": "a signature by another device key than the certificate's",
                    "transcript_hex": data.hex(),
                    "signature_der_hex": signature_p384.hex(),
                    "certificate": "pki.device_p256_certificate_pem",
                    "verdict": "reject",
                    "reason": "bad_signature",
                },
            ],
            "device_chains": [
                {
                    "name": "chain_for_another_device",
                    "chain": "pki.device_p256_chain_pem",
                    "expected_spiffe_id": OTHER_DEVICE_SPIFFE_ID,
                    "now": NOW,
                    "verdict": "reject",
                    "reason": "wrong_device",
                },
                {
                    "name": "chain_after_not_after",
                    "chain": "pki.device_p256_chain_pem",
                    "expected_spiffe_id": DEVICE_SPIFFE_ID,
                    "now": NOW + 31 * 86400,
                    "verdict": "reject",
                    "reason": "expired",
                },
                {
                    "name": "chain_ok",
                    "chain": "pki.device_p256_chain_pem",
                    "expected_spiffe_id": DEVICE_SPIFFE_ID,
                    "now": NOW,
                    "verdict": "accept",
                    "reason": "",
                },
            ],
            "frame_sequences": [
                {
                    "name": "in_order",
                    "key": "device_to_app",
                    "steps": [step(f1, "accept"), step(f2, "accept")],
                },
                {
                    "name": "replayed_sequence",
                    "key": "device_to_app",
                    "steps": [step(f1, "accept"), step(f2, "accept"), step(f2, "reject", "replay")],
                },
                {
                    "name": "reordered",
                    "key": "device_to_app",
                    "steps": [step(f2, "accept"), step(f1, "reject", "replay")],
                },
                {
                    "name": "gap_is_allowed",
                    "key": "device_to_app",
                    "steps": [step(f1, "accept"), step(gap, "accept")],
                },
                {
                    "name": "tampered_tag_then_original",
                    "key": "device_to_app",
                    "steps": [
                        {
                            "sequence": 1,
                            "ciphertext_hex": tampered.hex(),
                            "verdict": "reject",
                            "reason": "bad_tag",
                        },
                        step(f1, "accept"),
                    ],
                },
                {
                    "name": "sequence_zero",
                    "key": "device_to_app",
                    "steps": [
                        {
                            "sequence": 0,
                            "ciphertext_hex": frame_vector(keys.device_to_app, d2a, 0, b"frame 0")[
                                "ciphertext_hex"
                            ],
                            "verdict": "reject",
                            "reason": "replay",
                        }
                    ],
                },
                {
                    "name": "frame_sent_with_the_other_direction",
                    "key": "device_to_app",
                    "steps": [
                        {
                            "sequence": 1,
                            "ciphertext_hex": app_frames[0]["ciphertext_hex"],
                            "verdict": "reject",
                            "reason": "bad_tag",
                        }
                    ],
                },
            ],
        },
    }


# -- session tokens --------------------------------------------------------------------------------
def b64json(obj: dict[str, Any], *, sort_keys: bool = True) -> str:
    return tokens.b64url(json.dumps(obj, separators=(",", ":"), sort_keys=sort_keys).encode())


def jws(header: dict[str, Any], payload: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    """A compact ES256 JWS serialised exactly as broker.protocol.tokens.TokenKeyring.sign does
    (PyJWT: header keys sorted, payload in claim order, both without spaces)."""
    signing_input = b64json(header) + "." + b64json(payload, sort_keys=False)
    signature = der_to_raw(key.sign(signing_input.encode("ascii"), DETERMINISTIC_ECDSA), 32)
    return signing_input + "." + tokens.b64url(signature)


def hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = b64json(header) + "." + b64json(payload, sort_keys=False)
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + tokens.b64url(mac)


def token_vectors(pki: dict[str, x509.Certificate]) -> dict[str, Any]:
    key = ec_key(JWS_SIGNER_KEY, ec.SECP256R1())
    other = ec_key(JWS_OTHER_KEY, ec.SECP256R1())
    unpinned = ec_key(JWS_UNPINNED_KEY, ec.SECP256R1())
    pinned_jwk = tokens.public_jwk(key.public_key())
    unpinned_jwk = tokens.public_jwk(unpinned.public_key())
    del unpinned_jwk["alg"]  # published without a pinned algorithm: verifiers must ignore it
    jwks_json = json.dumps(
        {"keys": [pinned_jwk, unpinned_jwk]}, sort_keys=True, separators=(",", ":")
    )
    kid = pinned_jwk["kid"]
    header = {"alg": tokens.ALGORITHM, "kid": kid, "typ": "JWT"}
    app_eph_public = e2e.raw_public(x25519_key(APP_X25519_PRIVATE))
    cnf = tokens.cert_thumbprint(pki["app"].public_bytes(serialization.Encoding.DER))
    claims = tokens.SessionClaims(
        issuer=ISSUER,
        user_id=USER_ID,
        audience=DEVICE_SPIFFE_ID,
        session_id=SESSION_ID,
        scope=tokens.SCOPE_VIEW,
        issued_at=NOW,
        expires_at=NOW + 300,
        cnf_thumbprint=cnf,
        ephemeral_key_hash=tokens.key_hash(app_eph_public),
        app_id=APP_ID,
    )
    valid = claims.payload()

    def changed(**changes: Any) -> dict[str, Any]:
        payload = dict(valid)
        payload.update(changes)
        return payload

    def without(name: str) -> dict[str, Any]:
        return {k: v for k, v in valid.items() if k != name}

    valid_token = jws(header, valid, key)
    head, body, sig = valid_token.split(".")
    tampered_body = b64json(changed(sub="u-aaaaaaaaaaaaaaaa"), sort_keys=False)
    der_sig = key.sign(f"{head}.{body}".encode("ascii"), DETERMINISTIC_ECDSA)
    public_pem = spki_pem(key).encode("ascii")
    oversized = jws(header, changed(pad="x" * 3200), key)

    cases: list[tuple[str, str, str, str]] = [
        ("valid", valid_token, "accept", ""),
        ("iat_60s_ahead_is_tolerated", jws(header, changed(iat=NOW + 60, exp=NOW + 360), key),
         "accept", ""),
        ("exp_one_second_ahead", jws(header, changed(iat=NOW - 299, exp=NOW + 1), key),
         "accept", ""),
        ("empty", "", "reject", "missing_or_too_long"),
        ("longer_than_4096_chars", oversized, "reject", "missing_or_too_long"),
        ("not_a_jws", "not.a-token", "reject", "malformed"),
        ("alg_none", f"{b64json({'alg': 'none', 'kid': kid, 'typ': 'JWT'})}.{body}.", "reject",
         "alg_not_allowed"),
        ("hs256_with_the_public_key",
         hs256({"alg": "HS256", "kid": kid, "typ": "JWT"}, valid, public_pem),
         "reject", "alg_not_allowed"),
        ("es384_header_with_es256_kid", jws({**header, "alg": "ES384"}, valid, key),
         "reject", "alg_not_allowed"),
        ("unknown_kid", jws({**header, "kid": "no-such-key"}, valid, other), "reject",
         "unknown_key"),
        ("missing_kid", jws({"alg": "ES256", "typ": "JWT"}, valid, key), "reject", "unknown_key"),
        ("kid_not_pinned_to_es256", jws({**header, "kid": unpinned_jwk["kid"]}, valid, unpinned),
         "reject", "unknown_key"),
        ("wrong_key_for_kid", jws(header, valid, other), "reject", "bad_signature"),
        ("tampered_payload", f"{head}.{tampered_body}.{sig}", "reject", "bad_signature"),
        ("der_signature_in_jws", f"{head}.{body}.{tokens.b64url(der_sig)}", "reject",
         "bad_signature"),
        ("expired", jws(header, changed(iat=NOW - 300, exp=NOW), key), "reject", "expired"),
        ("iat_more_than_60s_ahead", jws(header, changed(iat=NOW + 61, exp=NOW + 300), key),
         "reject", "issued_in_future"),
        ("lifetime_over_5_minutes", jws(header, changed(exp=NOW + 301), key), "reject",
         "lifetime_too_long"),
        ("wrong_iss", jws(header, changed(iss="spiffe://other.example/broker"), key), "reject",
         "wrong_issuer"),
        ("wrong_aud", jws(header, changed(aud=OTHER_DEVICE_SPIFFE_ID), key), "reject",
         "wrong_audience"),
        ("aud_as_list", jws(header, changed(aud=[DEVICE_SPIFFE_ID]), key), "reject",
         "audience_not_a_single_string"),
        ("aud_list_with_two_devices",
         jws(header, changed(aud=[DEVICE_SPIFFE_ID, OTHER_DEVICE_SPIFFE_ID]), key), "reject",
         "audience_not_a_single_string"),
        ("wrong_scope", jws(header, changed(scope="stream:admin"), key), "reject", "wrong_scope"),
        ("cnf_not_an_object", jws(header, changed(cnf=cnf), key), "reject", "claims_malformed"),
        ("cnf_without_x5t_s256", jws(header, changed(cnf={"x5t": cnf}), key), "reject",
         "claims_malformed"),
    ]  # fmt: skip
    for claim in tokens.REQUIRED_CLAIMS:
        cases.append((f"missing_{claim}", jws(header, without(claim), key), "reject",
                      "missing_claim"))  # fmt: skip
    vectors = []
    for name, token, verdict, reason in cases:
        entry: dict[str, Any] = {"name": name, "token": token, "verdict": verdict}
        if verdict == "accept":
            entry["claims"] = json.loads(tokens_payload(token))
        else:
            entry["reason"] = reason
        vectors.append(entry)

    start_streams = [
        ("matching", SESSION_ID, app_eph_public, "accept", ""),
        ("other_session_id", "s-ffffffffffffffffffffffff", app_eph_public, "reject",
         "session_mismatch"),
        ("other_app_ephemeral_key", SESSION_ID, e2e.raw_public(x25519_key(DEVICE_X25519_PRIVATE)),
         "reject", "ephemeral_key_mismatch"),
    ]  # fmt: skip
    return {
        "now": NOW,
        "issuer": ISSUER,
        "audience": DEVICE_SPIFFE_ID,
        "jwks_json": jwks_json,
        "signing_key_pkcs8_pem": pkcs8_pem(key),
        "kid": kid,
        "header": header,
        "valid_claims": valid,
        "eph": {
            "app_ephemeral_public_key_hex": app_eph_public.hex(),
            "sha256_hex": hashlib.sha256(app_eph_public).hexdigest(),
            "claim": tokens.key_hash(app_eph_public),
        },
        "cnf": {
            "app_certificate_der_sha256_hex": hashlib.sha256(
                pki["app"].public_bytes(serialization.Encoding.DER)
            ).hexdigest(),
            "x5t#S256": cnf,
        },
        "vectors": vectors,
        "start_stream": [
            {
                "name": name,
                "token": "valid",
                "session_id": sid,
                "app_ephemeral_public_key_hex": eph.hex(),
                "verdict": verdict,
                "reason": reason,
            }
            for name, sid, eph, verdict, reason in start_streams
        ],
    }


def tokens_payload(token: str) -> str:
    """The decoded JSON payload of a compact JWS."""
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode("utf-8")


# -- renewal after expiry --------------------------------------------------------------------------
def renew_expired_vectors(pki: dict[str, x509.Certificate]) -> dict[str, Any]:
    """Bootstrap.RenewExpiredCertificate for the P-256 camera, ten days after its expiry."""
    leaf = pki["device_p256"]
    device_key = ec_key(DEVICE_P256_KEY, ec.SECP256R1())
    new_key = ec_key(RENEW_NEW_KEY, ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(new_key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    leaf_der = leaf.public_bytes(serialization.Encoding.DER)
    csr_der = csr.public_bytes(serialization.Encoding.DER)
    timestamp = int(leaf.not_valid_after_utc.timestamp()) + 10 * 86400
    good = renewal.RenewalTranscript(leaf_der, csr_der, RENEW_NONCE, timestamp)
    data = good.encode()
    signature = device_key.sign(data, DETERMINISTIC_ECDSA)
    if not renewal.renewal_signature_valid(leaf.public_key(), good, signature):
        raise AssertionError("the broker's check must accept the vector signature")
    names = ("label", "leaf_sha256", "csr_sha256", "nonce", "timestamp")
    later = renewal.RenewalTranscript(leaf_der, csr_der, RENEW_NONCE, timestamp + 1)
    other_key = ec_key(APP_P256_KEY, ec.SECP256R1())
    return {
        "certificate_chain_pem": pem(leaf) + pem(pki["issuing"]),
        "leaf_der_hex": leaf_der.hex(),
        "expired_at": int(leaf.not_valid_after_utc.timestamp()),
        "new_private_key_pkcs8_pem": pkcs8_pem(new_key),
        "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "csr_der_hex": csr_der.hex(),
        "nonce_hex": RENEW_NONCE.hex(),
        "timestamp": timestamp,
        "transcript_fields": [
            {
                "field": name,
                "length": len(value),
                "length_prefix_hex": struct.pack(">I", len(value)).hex(),
                "value_hex": value.hex(),
            }
            for name, value in zip(names, good.fields(), strict=True)
        ],
        "transcript_hex": data.hex(),
        "signature": {"der_hex": signature.hex(), "verdict": "accept"},
        "negative": [
            {
                "case": "signed_by_another_key",
                "signature_der_hex": other_key.sign(data, DETERMINISTIC_ECDSA).hex(),
                "verdict": "reject",
            },
            {
                "case": "signature_over_another_timestamp",
                "signature_der_hex": device_key.sign(later.encode(), DETERMINISTIC_ECDSA).hex(),
                "verdict": "reject",
            },
            {
                "case": "raw_r_s_instead_of_der",
                "signature_der_hex": der_to_raw(signature, 32).hex(),
                "verdict": "reject",
            },
        ],
    }


# -- the document ----------------------------------------------------------------------------------
def build_vectors() -> dict[str, Any]:
    """The whole vector document (pure: same output on every run)."""
    pki = make_pki()
    chain = pem(pki["device_p256"]) + pem(pki["issuing"])
    vectors: dict[str, Any] = {
        "description": "Test vectors for the camera broker wire protocol v1 (docs/PROTOCOL.md). "
        "Generated by tools/make_vectors.py; the keys are public test keys.",
        "format_version": 1,
        "now": NOW,
        "now_utc": at(0).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "trust_domain": TRUST_DOMAIN,
        "notes": [
            "All ECDSA signatures here use RFC 6979 deterministic nonces so the file is "
            "reproducible; implementations MAY sign with random nonces and verifiers MUST accept "
            "any valid signature.",
            "Hex is lowercase; base64url is unpadded (RFC 7515).",
            "now is in the future on purpose, so verifiers that also check exp against the wall "
            "clock give the stated verdicts; inject now as the verifier's clock.",
        ],
        "pki": {
            "root_ca_pem": pem(pki["root"]),
            "issuing_ca_pem": pem(pki["issuing"]),
            "device_p256_private_key_pkcs8_pem": pkcs8_pem(ec_key(DEVICE_P256_KEY, ec.SECP256R1())),
            "device_p256_certificate_pem": pem(pki["device_p256"]),
            "device_p256_chain_pem": chain,
            "device_p384_private_key_pkcs8_pem": pkcs8_pem(ec_key(DEVICE_P384_KEY, ec.SECP384R1())),
            "device_p384_certificate_pem": pem(pki["device_p384"]),
            "app_private_key_pkcs8_pem": pkcs8_pem(ec_key(APP_P256_KEY, ec.SECP256R1())),
            "app_certificate_pem": pem(pki["app"]),
            "device_spiffe_id": DEVICE_SPIFFE_ID,
            "app_spiffe_id": APP_SPIFFE_ID,
        },
        "e2e": e2e_vectors(pki),
        "tokens": token_vectors(pki),
        "renew_expired": renew_expired_vectors(pki),
    }
    return vectors


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=2, ensure_ascii=True) + "\n"


def main(argv: list[str]) -> int:
    text = render(build_vectors())
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run .venv/bin/python tools/make_vectors.py")
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
