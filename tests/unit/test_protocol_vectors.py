"""docs/test-vectors.json against the code, and docs/PROTOCOL.md against the code's constants.

(a) The generator reproduces the committed file byte for byte, and every deterministic value in it
    (transcript, HKDF outputs, nonces, AAD, ciphertexts) is recomputed here from the project's own
    functions and from the spec's byte layout.
(b) The stored handshake signatures verify with broker.protocol.e2e; the negative e2e vectors get
    their stated verdicts (I6).
(c) Every token vector gets its stated verdict from both verifiers: the broker's TokenVerifier and
    the camera SDK's DeviceClient.token_verifier(), with the clock at the vector's "now" (I5).
(d) PROTOCOL.md names every label, claim, constant, RPC and message the code uses, verbatim.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import re
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker._proto.broker.v1 import (
    admin_pb2,
    app_pb2,
    bootstrap_pb2,
    common_pb2,
    device_pb2,
)
from broker.client.device import AttachSession, DeviceClient, DeviceState, Endpoints
from broker.clock import FakeClock
from broker.config import Config
from broker.errors import PermissionDenied
from broker.pemfile import write_atomic, write_private_key
from broker.protocol import e2e, tokens
from broker.service import app as app_service
from broker.service import device as device_service
from broker.service.status import STATUS_BY_ERROR
from tools.make_vectors import OUTPUT, ROOT, build_vectors, render

PROTOCOL_MD = ROOT / "docs" / "PROTOCOL.md"
VECTORS: dict[str, Any] = json.loads(OUTPUT.read_text())
E2E: dict[str, Any] = VECTORS["e2e"]
TOKENS: dict[str, Any] = VECTORS["tokens"]
PKI: dict[str, Any] = VECTORS["pki"]
NOW = dt.datetime.fromtimestamp(VECTORS["now"], dt.UTC)

# Why a verifier refused, as the short reason codes of the vector file → the SDK's message.
TOKEN_REASONS = {
    "missing_or_too_long": r"^session token missing or too long$",
    "malformed": r"^session token is malformed$",
    "unknown_key": r"^session token signed by an unknown key$",
    "alg_not_allowed": r"^session token refused: .*alg",
    "bad_signature": r"^session token refused: Signature verification failed$",
    "missing_claim": r'^session token refused: Token is missing the "\w+" claim$',
    "wrong_issuer": r"^session token refused: Invalid issuer$",
    "wrong_audience": r"^session token refused: Audience doesn't match$",
    "audience_not_a_single_string": r"^session token audience is not exactly this device$",
    "claims_malformed": r"^session token claims are malformed$",
    "expired": r"^session token has expired$",
    "issued_in_future": r"^session token is issued in the future$",
    "lifetime_too_long": r"^session token lifetime exceeds 5 minutes$",
    "wrong_scope": r"^session token scope is not stream:view$",
    "session_mismatch": r"^token was minted for another session$",
    "ephemeral_key_mismatch": r"^app key does not match the session token$",
}
FRAME_REASONS = {"replay": "replayed or out of order", "bad_tag": "does not decrypt"}


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def cert(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(PKI[name].encode("ascii"))


def binding() -> e2e.SessionBinding:
    b = E2E["binding"]
    return e2e.SessionBinding(
        b["session_id"],
        b["device_spiffe_id"],
        b["user_id"],
        b["cnf_thumbprint"],
        h(b["app_ephemeral_public_key_hex"]),
        h(b["device_ephemeral_public_key_hex"]),
    )


def session_keys() -> e2e.SessionKeys:
    app = x25519.X25519PrivateKey.from_private_bytes(h(E2E["app_ephemeral_private_key_hex"]))
    shared = app.exchange(x25519.X25519PublicKey.from_public_bytes(binding().device_ephemeral))
    return e2e.derive_keys(shared, binding())


def opener_key(name: str) -> tuple[bytes, int]:
    keys = session_keys()
    if name == "device_to_app":
        return keys.device_to_app, e2e.DEVICE_TO_APP
    return keys.app_to_device, e2e.APP_TO_DEVICE


# -- (a) reproducible, and every deterministic value recomputed -----------------------------------
def test_generator_reproduces_the_committed_file_byte_for_byte() -> None:
    assert render(build_vectors()) == OUTPUT.read_text(), (
        "docs/test-vectors.json is stale: run .venv/bin/python tools/make_vectors.py"
    )


def test_transcript_is_the_length_prefixed_fields_in_order() -> None:
    data = e2e.transcript(binding())
    assert data.hex() == E2E["transcript_hex"]
    assert hashlib.sha256(data).hexdigest() == E2E["transcript_sha256_hex"]
    fields = E2E["transcript_fields"]
    assert [f["field"] for f in fields] == [
        "label",
        "session_id",
        "device_spiffe_id",
        "user_id",
        "cnf_thumbprint",
        "app_ephemeral_public_key",
        "device_ephemeral_public_key",
    ]
    rebuilt = b"".join(
        struct.pack(">I", len(h(f["value_hex"]))) + h(f["value_hex"]) for f in fields
    )
    assert rebuilt == data
    assert h(fields[0]["value_hex"]) == e2e.PROTOCOL == b"camera-broker e2e v1"
    assert data[:24] == b"\x00\x00\x00\x14camera-broker e2e v1"
    for f in fields:
        assert f["length_prefix_hex"] == struct.pack(">I", f["length"]).hex()


def test_cnf_and_ephemeral_keys_are_derived_as_documented() -> None:
    app_der = cert("app_certificate_pem").public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(app_der).hexdigest() == E2E["app_certificate_der_sha256_hex"]
    assert tokens.cert_thumbprint(app_der) == E2E["binding"]["cnf_thumbprint"]
    for side in ("app", "device"):
        private = x25519.X25519PrivateKey.from_private_bytes(
            h(E2E[f"{side}_ephemeral_private_key_hex"])
        )
        assert e2e.raw_public(private).hex() == E2E["binding"][f"{side}_ephemeral_public_key_hex"]


def test_shared_secret_and_hkdf_outputs() -> None:
    app = x25519.X25519PrivateKey.from_private_bytes(h(E2E["app_ephemeral_private_key_hex"]))
    dev = x25519.X25519PrivateKey.from_private_bytes(h(E2E["device_ephemeral_private_key_hex"]))
    shared = app.exchange(dev.public_key())
    assert shared == dev.exchange(app.public_key())
    assert shared.hex() == E2E["x25519_shared_secret_hex"]
    hkdf = E2E["hkdf"]
    keys = e2e.derive_keys(shared, binding())
    assert keys.device_to_app.hex() == hkdf["key_device_to_app_hex"]
    assert keys.app_to_device.hex() == hkdf["key_app_to_device_hex"]
    # The same from the spec alone: salt = SHA-256(transcript), info = label + " device->app".
    assert hkdf["salt_hex"] == E2E["transcript_sha256_hex"]
    assert h(hkdf["info_device_to_app_hex"]) == b"camera-broker e2e v1 device->app"
    assert h(hkdf["info_app_to_device_hex"]) == b"camera-broker e2e v1 app->device"
    for info, expected in (
        (hkdf["info_device_to_app_hex"], hkdf["key_device_to_app_hex"]),
        (hkdf["info_app_to_device_hex"], hkdf["key_app_to_device_hex"]),
    ):
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=h(hkdf["salt_hex"]), info=h(info)
        ).derive(shared)
        assert derived.hex() == expected


def test_frames_nonce_aad_and_ciphertext_layout() -> None:
    """Nonce = u32be(direction) || u64be(sequence); AAD = utf8(sid) || u64be(sequence);
    ciphertext = AES-256-GCM output with the 16-byte tag last (I6)."""
    sid = E2E["binding"]["session_id"]
    frames = E2E["frames"]
    assert [(f["direction"], f["sequence"]) for f in frames] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 7),
        (2, 1),
    ]
    for frame in frames:
        key, direction = opener_key("device_to_app" if frame["direction"] == 1 else "app_to_device")
        assert frame["direction"] == direction
        nonce = struct.pack(">IQ", direction, frame["sequence"])
        aad = sid.encode() + struct.pack(">Q", frame["sequence"])
        assert frame["nonce_hex"] == nonce.hex()
        assert frame["aad_hex"] == aad.hex()
        sealed = AESGCM(key).encrypt(nonce, h(frame["plaintext_hex"]), aad)
        assert sealed.hex() == frame["ciphertext_hex"]
        assert sealed[-16:].hex() == frame["tag_hex"]
        assert len(sealed) == len(h(frame["plaintext_hex"])) + 16
        opener = e2e.Opener(key, sid, direction)
        assert opener.open(frame["sequence"], sealed).hex() == frame["plaintext_hex"]


def test_sealer_numbers_frames_from_one() -> None:
    """The project's Sealer produces exactly the vector frames 1, 2, 3 (sequence starts at 1)."""
    keys = session_keys()
    sid = E2E["binding"]["session_id"]
    sealer = e2e.Sealer(keys.device_to_app, sid, e2e.DEVICE_TO_APP)
    for frame in E2E["frames"][:3]:
        sequence, ciphertext = sealer.seal(h(frame["plaintext_hex"]))
        assert (sequence, ciphertext.hex()) == (frame["sequence"], frame["ciphertext_hex"])
    app_sealer = e2e.Sealer(keys.app_to_device, sid, e2e.APP_TO_DEVICE)
    assert app_sealer.seal(h(E2E["frames"][4]["plaintext_hex"])) == (
        1,
        h(E2E["frames"][4]["ciphertext_hex"]),
    )


# -- (b) signatures verify; negative e2e vectors ---------------------------------------------------
@pytest.mark.parametrize(
    ("vector", "certificate", "size"),
    [
        ("signature", "device_p256_certificate_pem", 32),
        ("signature_p384", "device_p384_certificate_pem", 48),
    ],
)
def test_i6_stored_handshake_signatures_verify(vector: str, certificate: str, size: int) -> None:
    signature = h(E2E[vector]["der_hex"])
    e2e.verify_transcript_signature(cert(certificate), h(E2E["transcript_hex"]), signature)
    raw = h(E2E[vector]["raw_r_s_hex"])
    assert len(raw) == 2 * size
    r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
    assert encode_dss_signature(r, s) == signature  # the documented r||s → DER conversion


def test_i6_app_side_accepts_the_vector_hello_and_decrypts_frame_one() -> None:
    app = x25519.X25519PrivateKey.from_private_bytes(h(E2E["app_ephemeral_private_key_hex"]))
    opener = e2e.app_side(
        app, cert("device_p256_certificate_pem"), binding(), h(E2E["signature"]["der_hex"])
    )
    first = E2E["frames"][0]
    assert opener.open(1, h(first["ciphertext_hex"])) == h(first["plaintext_hex"])


@pytest.mark.parametrize("case", E2E["negative"]["signatures"], ids=lambda c: c["name"])
def test_i6_bad_handshake_signatures_are_refused(case: dict[str, Any]) -> None:
    assert case["verdict"] == "reject"
    certificate = cert(case["certificate"].removeprefix("pki."))
    with pytest.raises(e2e.HandshakeError, match="does not verify"):
        e2e.verify_transcript_signature(
            certificate, h(case["transcript_hex"]), h(case["signature_der_hex"])
        )


@pytest.mark.parametrize("case", E2E["negative"]["device_chains"], ids=lambda c: c["name"])
def test_i6_device_chain_vectors(case: dict[str, Any]) -> None:
    roots = [cert("root_ca_pem")]
    issuing = e2e.verify_issuing_cas(PKI["issuing_ca_pem"], roots)
    assert len(issuing) == 1
    chain = PKI[case["chain"].removeprefix("pki.")]
    now = dt.datetime.fromtimestamp(case["now"], dt.UTC)
    if case["verdict"] == "accept":
        leaf = e2e.verify_device_chain(chain, issuing, case["expected_spiffe_id"], now)
        assert leaf == cert("device_p256_certificate_pem")
        return
    message = {"wrong_device": "not spiffe://", "expired": "expired"}[case["reason"]]
    with pytest.raises(e2e.HandshakeError, match=message):
        e2e.verify_device_chain(chain, issuing, case["expected_spiffe_id"], now)


@pytest.mark.parametrize("case", E2E["negative"]["frame_sequences"], ids=lambda c: c["name"])
def test_i6_frame_sequence_rules(case: dict[str, Any]) -> None:
    """Receivers refuse replays, reordering, sequence 0 and forged frames; gaps are allowed."""
    key, direction = opener_key(case["key"])
    opener = e2e.Opener(key, E2E["binding"]["session_id"], direction)
    for step in case["steps"]:
        if step["verdict"] == "accept":
            opener.open(step["sequence"], h(step["ciphertext_hex"]))
        else:
            with pytest.raises(e2e.FrameRejected, match=FRAME_REASONS[step["reason"]]):
                opener.open(step["sequence"], h(step["ciphertext_hex"]))


# -- (c) token vectors through both verifiers ------------------------------------------------------
def broker_verify(token: str) -> tokens.SessionClaims:
    verifier = tokens.TokenVerifier(TOKENS["jwks_json"], TOKENS["issuer"], FakeClock(NOW))
    return verifier.verify(token, TOKENS["audience"])


@pytest.fixture(scope="module")
def camera(tmp_path_factory: pytest.TempPathFactory) -> DeviceClient:
    """A camera SDK identity directory holding the vector device key, chain and trust bundle."""
    directory = tmp_path_factory.mktemp("camera")
    client = DeviceClient(
        directory, Endpoints("127.0.0.1:1", "127.0.0.1:1"), PKI["root_ca_pem"].encode("ascii")
    )
    key = serialization.load_pem_private_key(
        PKI["device_p256_private_key_pkcs8_pem"].encode("ascii"), password=None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    write_private_key(client.key_path, key)
    write_atomic(client.chain_path, PKI["device_p256_chain_pem"].encode("ascii"))
    client.save_trust_bundle(
        common_pb2.TrustBundle(
            ca_certificates_pem=PKI["root_ca_pem"],
            issuing_certificates_pem=PKI["issuing_ca_pem"],
            jwks_json=TOKENS["jwks_json"],
            version="vectors",
        )
    )
    state = DeviceState("cam-vectors-1", PKI["device_spiffe_id"], 0, 0, "vectors")
    write_atomic(client.state_path, json.dumps(asdict(state)).encode())
    return client


@pytest.mark.parametrize("vector", TOKENS["vectors"], ids=lambda v: v["name"])
def test_i5_token_vector_verdict_broker_side(vector: dict[str, Any]) -> None:
    if vector["verdict"] == "accept":
        assert broker_verify(vector["token"]).payload() == vector["claims"]
    else:
        with pytest.raises(PermissionDenied, match=TOKEN_REASONS[vector["reason"]]):
            broker_verify(vector["token"])


@pytest.mark.parametrize("vector", TOKENS["vectors"], ids=lambda v: v["name"])
def test_i5_token_vector_verdict_camera_side(camera: DeviceClient, vector: dict[str, Any]) -> None:
    verifier = camera.token_verifier(FakeClock(NOW))
    if vector["verdict"] == "accept":
        assert verifier.verify(vector["token"]).payload() == vector["claims"]
    else:
        with pytest.raises(PermissionDenied, match=TOKEN_REASONS[vector["reason"]]):
            verifier.verify(vector["token"])


def test_i5_token_vectors_cover_every_reason_and_required_claim() -> None:
    reasons = {v["reason"] for v in TOKENS["vectors"] if v["verdict"] == "reject"}
    assert reasons | {"session_mismatch", "ephemeral_key_mismatch"} == set(TOKEN_REASONS)
    names = {v["name"] for v in TOKENS["vectors"]}
    assert {f"missing_{claim}" for claim in tokens.REQUIRED_CLAIMS} <= names
    valid = next(v for v in TOKENS["vectors"] if v["name"] == "valid")
    assert valid["claims"] == TOKENS["valid_claims"]
    assert set(valid["claims"]) == set(tokens.REQUIRED_CLAIMS)
    assert TOKENS["eph"]["claim"] == tokens.key_hash(
        h(TOKENS["eph"]["app_ephemeral_public_key_hex"])
    )
    assert valid["claims"]["eph"] == TOKENS["eph"]["claim"]
    assert valid["claims"]["cnf"] == {"x5t#S256": TOKENS["cnf"]["x5t#S256"]}


def test_i5_valid_vector_is_serialised_like_the_broker_signs(tmp_path: Path) -> None:
    """TokenKeyring.sign of the vector claims with the vector key gives the same JOSE header and
    payload segments (the signature differs: the broker signs with random ECDSA nonces)."""
    key = serialization.load_pem_private_key(
        TOKENS["signing_key_pkcs8_pem"].encode("ascii"), password=None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    kid = TOKENS["kid"]
    write_private_key(tmp_path / f"{kid}.key", key)
    index = {"active": kid, "published": [{"kid": kid, "retire_after": None}]}
    write_atomic(tmp_path / "keys.json", json.dumps(index).encode())
    keyring = tokens.TokenKeyring(tmp_path)
    valid = TOKENS["vectors"][0]
    assert valid["name"] == "valid"
    c = valid["claims"]
    claims = tokens.SessionClaims(
        c["iss"], c["sub"], c["aud"], c["sid"], c["scope"], c["iat"], c["exp"],
        c["cnf"]["x5t#S256"], c["eph"], c["app"],
    )  # fmt: skip
    signed = keyring.sign(claims)
    assert signed.split(".")[:2] == valid["token"].split(".")[:2]
    assert broker_verify(signed) == claims
    published = json.loads(keyring.jwks_json())["keys"]
    assert published == [k for k in json.loads(TOKENS["jwks_json"])["keys"] if k.get("alg")]


class FakeAttachCall:
    """Stands in for the Attach stream: records what the camera writes."""

    def __init__(self) -> None:
        self.sent: list[device_pb2.DeviceMessage] = []

    async def write(self, message: device_pb2.DeviceMessage) -> None:
        self.sent.append(message)


@pytest.mark.parametrize("case", TOKENS["start_stream"], ids=lambda c: c["name"])
def test_i5_i6_camera_answers_start_stream_vectors(
    camera: DeviceClient, case: dict[str, Any]
) -> None:
    """The camera SDK's full StartStream check (token, sid, eph) with the vector token: on accept
    its StreamAccept verifies at the app and its first frame decrypts; otherwise a StreamReject."""
    assert case["token"] == "valid"
    call = FakeAttachCall()
    session = AttachSession(cast(Any, call), camera)
    app_eph = h(case["app_ephemeral_public_key_hex"])
    start = device_pb2.StartStream(
        session_id=case["session_id"],
        token=TOKENS["vectors"][0]["token"],
        app_ephemeral_public_key=app_eph,
    )

    async def run() -> tuple[bytes, int, bytes] | None:
        stream = await session.accept_stream(start, FakeClock(NOW))
        sequence, ciphertext = stream.sealer.seal(b"first frame")
        return b"first frame", sequence, ciphertext

    if case["verdict"] == "reject":
        with pytest.raises(PermissionDenied, match=TOKEN_REASONS[case["reason"]]):
            asyncio.run(run())
        assert [m.WhichOneof("kind") for m in call.sent] == ["stream_reject"]
        assert call.sent[0].stream_reject.session_id == case["session_id"]
        return
    result = asyncio.run(run())
    assert result is not None
    plaintext, sequence, ciphertext = result
    assert [m.WhichOneof("kind") for m in call.sent] == ["stream_accept"]
    accept = call.sent[0].stream_accept
    claims = TOKENS["valid_claims"]
    app_private = x25519.X25519PrivateKey.from_private_bytes(
        h(E2E["app_ephemeral_private_key_hex"])
    )
    opener = e2e.app_side(
        app_private,
        cert("device_p256_certificate_pem"),
        e2e.SessionBinding(
            case["session_id"],
            PKI["device_spiffe_id"],
            claims["sub"],
            claims["cnf"]["x5t#S256"],
            app_eph,
            accept.device_ephemeral_public_key,
        ),
        accept.signature,
    )
    assert sequence == 1
    assert opener.open(sequence, ciphertext) == plaintext


# -- (d) the document names what the code uses ----------------------------------------------------
def _message_fields(message: Any) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.fields}


def test_protocol_md_mentions_every_constant_the_code_uses() -> None:
    doc = PROTOCOL_MD.read_text()
    config = Config(home=Path("/nonexistent"))
    must_mention = [
        e2e.PROTOCOL.decode(),
        (e2e.PROTOCOL + b" device->app").decode(),
        (e2e.PROTOCOL + b" app->device").decode(),
        f"DEVICE_TO_APP = {e2e.DEVICE_TO_APP}",
        f"APP_TO_DEVICE = {e2e.APP_TO_DEVICE}",
        tokens.ALGORITHM,
        tokens.SCOPE_VIEW,
        "x5t#S256",
        str(tokens.MAX_TOKEN_CHARS),
        f"{config.heartbeat_interval_seconds} s",
        f"{config.attach_hello_timeout_seconds:g} s",
        f"{app_service.HANDSHAKE_TIMEOUT:g} s",
        f"{device_service.MAX_FRAME_BYTES} bytes",
        f"{config.max_message_bytes} bytes",
        f"{config.session_token_ttl_seconds} s",
        config.bootstrap_address.rsplit(":", 1)[1],
        config.main_address.rsplit(":", 1)[1],
        config.factory_address.rsplit(":", 1)[1],
        "spiffe://<td>/broker",
        "docs/test-vectors.json",
        "tools/make_vectors.py",
    ]
    must_mention += [f'"{claim}"' for claim in tokens.REQUIRED_CLAIMS]
    must_mention += [code.name for code in STATUS_BY_ERROR.values()]
    for module in (bootstrap_pb2, device_pb2, app_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            must_mention += [f"{service.name}.{m.name}" for m in service.methods]
    must_mention += sorted(_message_fields(device_pb2.DeviceMessage))
    must_mention += sorted(_message_fields(device_pb2.BrokerMessage))
    must_mention += sorted(_message_fields(app_pb2.StreamEvent))
    missing = [item for item in must_mention if item not in doc]
    assert not missing, f"docs/PROTOCOL.md does not mention: {missing}"


def test_protocol_md_uses_normative_language_and_no_python_paths() -> None:
    doc = PROTOCOL_MD.read_text()
    assert "MUST" in doc and "SHOULD" in doc and "RFC 2119" in doc
    # Firmware authors do not read our Python: the spec never sends them to a module.
    assert not re.search(r"broker/[a-z_/]+\.py", doc)


# -- (e) renewal after expiry (docs/PROTOCOL.md 4.5) ----------------------------------------------
RENEW: dict[str, Any] = VECTORS["renew_expired"]


def _renew_transcript(timestamp: int | None = None) -> Any:
    from broker.protocol.renewal import RenewalTranscript

    return RenewalTranscript(
        bytes.fromhex(RENEW["leaf_der_hex"]),
        bytes.fromhex(RENEW["csr_der_hex"]),
        bytes.fromhex(RENEW["nonce_hex"]),
        RENEW["timestamp"] if timestamp is None else timestamp,
    )


def test_renew_expired_transcript_is_the_length_prefixed_fields_in_order() -> None:
    from broker.protocol.renewal import LABEL

    leaf = x509.load_pem_x509_certificates(RENEW["certificate_chain_pem"].encode())[0]
    csr = x509.load_pem_x509_csr(RENEW["csr_pem"].encode())
    assert leaf.public_bytes(serialization.Encoding.DER).hex() == RENEW["leaf_der_hex"]
    assert csr.public_bytes(serialization.Encoding.DER).hex() == RENEW["csr_der_hex"]
    assert RENEW["expired_at"] == int(leaf.not_valid_after_utc.timestamp()) < RENEW["timestamp"]
    # The spec's layout, from the spec alone: label, two SHA-256, nonce, u64be timestamp.
    expected = [
        LABEL,
        hashlib.sha256(bytes.fromhex(RENEW["leaf_der_hex"])).digest(),
        hashlib.sha256(bytes.fromhex(RENEW["csr_der_hex"])).digest(),
        bytes.fromhex(RENEW["nonce_hex"]),
        struct.pack(">Q", RENEW["timestamp"]),
    ]
    fields = RENEW["transcript_fields"]
    assert [bytes.fromhex(f["value_hex"]) for f in fields] == expected
    assert [f["length_prefix_hex"] for f in fields] == [
        struct.pack(">I", len(v)).hex() for v in expected
    ]
    by_spec = b"".join(struct.pack(">I", len(v)) + v for v in expected)
    assert by_spec.hex() == RENEW["transcript_hex"] == _renew_transcript().encode().hex()
    assert fields[0]["length_prefix_hex"] + fields[0]["value_hex"] == (
        "00000017" + b"broker.v1 renew-expired".hex()
    )


def test_i1_renew_expired_signature_vectors_get_their_verdicts() -> None:
    """Only the expired certificate's key, over exactly this transcript, DER-encoded."""
    from broker.protocol.renewal import renewal_signature_valid

    leaf = x509.load_pem_x509_certificates(RENEW["certificate_chain_pem"].encode())[0]
    good = bytes.fromhex(RENEW["signature"]["der_hex"])
    assert renewal_signature_valid(leaf.public_key(), _renew_transcript(), good)
    assert not renewal_signature_valid(
        leaf.public_key(), _renew_transcript(RENEW["timestamp"] + 1), good
    )
    for case in RENEW["negative"]:
        signature = bytes.fromhex(case["signature_der_hex"])
        verdict = renewal_signature_valid(leaf.public_key(), _renew_transcript(), signature)
        assert (case["verdict"], verdict) == ("reject", False), case["case"]


def test_sdk_builds_the_vector_request_byte_for_byte(tmp_path: Path) -> None:
    """The SDK's request for the vector inputs carries the vector transcript's signature."""
    from broker.client.identity_dir import expired_renewal_request
    from broker.protocol.renewal import renewal_signature_valid

    key = serialization.load_pem_private_key(
        PKI["device_p256_private_key_pkcs8_pem"].encode(), None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    request = expired_renewal_request(
        key,
        RENEW["certificate_chain_pem"].encode(),
        RENEW["csr_pem"],
        RENEW["timestamp"],
        bytes.fromhex(RENEW["nonce_hex"]),
    )
    assert request.certificate_chain_pem == RENEW["certificate_chain_pem"]
    assert (request.nonce.hex(), request.timestamp) == (RENEW["nonce_hex"], RENEW["timestamp"])
    leaf = x509.load_pem_x509_certificates(RENEW["certificate_chain_pem"].encode())[0]
    assert renewal_signature_valid(leaf.public_key(), _renew_transcript(), request.signature)


def test_protocol_md_specifies_renewal_after_expiry() -> None:
    from broker.protocol.renewal import LABEL, MAX_NONCE_BYTES, MAX_SKEW_SECONDS, MIN_NONCE_BYTES

    doc = PROTOCOL_MD.read_text()
    config = Config(home=Path("/nonexistent"))
    for item in (
        LABEL.decode(),
        f"{MAX_SKEW_SECONDS} s",
        f"{MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes",
        f"{config.device_expired_renewal_days} days",
        f"{config.app_expired_renewal_days} days",
        "certificate.renew_expired.denied",
        "certificate.renewed_after_expiry",
        *sorted(_message_fields(bootstrap_pb2.RenewExpiredCertificateRequest)),
    ):
        assert item in doc, item
