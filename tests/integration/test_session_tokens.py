"""Certificate-bound session tokens and who may ask for them (issue 3), through the real server.

I5: a token is bound to user, device, app certificate (cnf) and session; the broker (at Watch) and
the camera (DeviceClient.token_verifier) both verify it, each with one pinned algorithm per kid.
Every forgery below is refused by the broker-side TokenVerifier built from the published JWKS, by
the broker's own Sessions.verify_for_watch, and by the camera's verifier.
I9: no operator (and no device) identity gets anywhere in AppService.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import message_factory

from broker._proto.broker.v1 import app_pb2, app_pb2_grpc, bootstrap_pb2
from broker.client.device import DeviceClient, Endpoints
from broker.errors import PermissionDenied
from broker.identity.spiffe import Identity, Kind
from broker.pemfile import read_private_key
from broker.protocol.tokens import ALGORITHM, SessionClaims, TokenKeyring, TokenVerifier, b64url
from broker.store import SessionOutcome
from tests.helpers import (
    PASSWORD,
    AppCreds,
    app_call,
    bootstrap_stub,
    claim_code_hash_of,
    count_rows,
    create_token,
    device_spiffe,
    enroll_app,
    enroll_camera,
    new_user,
    open_session,
    renew_app,
    rpc_error,
    session_rows,
    share_device,
)

CAM_X = "cam-x"
CAM_Y = "cam-y"


@dataclass
class Scene:
    """Two cameras enrolled through the SDK (so each has its own trust bundle and verifier), a user
    owning camera X, and one genuine session token for it."""

    broker: Any
    camera_x: DeviceClient
    camera_y: DeviceClient
    user: AppCreds
    session_id: str
    token: str

    @property
    def keyring(self) -> TokenKeyring:
        return TokenKeyring(self.broker.config.certs_dir / "token-keys")

    @property
    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        kid = self.keyring.active_kid
        key = read_private_key(self.broker.config.certs_dir / "token-keys" / f"{kid}.key")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def jwks_json(self) -> str:
        channel, stub = bootstrap_stub(self.broker)
        with channel:
            response = stub.GetTrustBundle(bootstrap_pb2.GetTrustBundleRequest(), timeout=10)
        return str(response.trust_bundle.jwks_json)

    def claims(self) -> SessionClaims:
        return self.broker_verifier().verify(self.token, device_spiffe(CAM_X))

    def broker_verifier(self) -> TokenVerifier:
        return TokenVerifier(
            self.jwks_json(), self.broker.config.broker_spiffe_id, self.broker.clock
        )

    def verify_everywhere(self, token: str) -> list[Callable[[], object]]:
        """The three checks a token for camera X must pass: broker JWKS verifier, the broker's
        own verify_for_watch for the user's certificate, and camera X's verifier."""
        sessions = self.broker.server.runtime.sessions
        device_verifier = self.camera_x.token_verifier(self.broker.clock)
        return [
            lambda: self.broker_verifier().verify(token, device_spiffe(CAM_X)),
            lambda: sessions.verify_for_watch(
                self.user.identity, self.user.thumbprint, self.session_id, token
            ),
            lambda: device_verifier.verify(token),
        ]


@pytest.fixture
def scene(broker, operator_channel, tmp_path) -> Scene:
    endpoints = Endpoints(broker.bootstrap, broker.main)
    camera_x = DeviceClient(tmp_path / "cam-x", endpoints, broker.pki.ca_pem)
    camera_y = DeviceClient(tmp_path / "cam-y", endpoints, broker.pki.ca_pem)

    async def enroll_both() -> None:
        await camera_x.enroll(create_token(operator_channel, CAM_X))
        await camera_y.enroll(create_token(operator_channel, CAM_Y))

    asyncio.run(enroll_both())
    user = new_user(broker, "anna")
    app_call(
        broker,
        user,
        "ClaimDevice",
        app_pb2.ClaimDeviceRequest(device_id=CAM_X, claim_code=camera_x.state.claim_code),
    )
    opened = open_session(broker, user, CAM_X)
    return Scene(broker, camera_x, camera_y, user, opened.session_id, opened.token)


def b64json(obj: object) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def assert_refused(check: Callable[[], object], reason: str) -> None:
    with pytest.raises(PermissionDenied) as info:
        check()
    assert re.search(reason, info.value.message, re.IGNORECASE), info.value.message


# -- forgeries: each builder returns a token and the reason it must be refused for ---------------


def forge_alg_none(s: Scene) -> tuple[str, str]:
    header = {"alg": "none", "typ": "JWT", "kid": s.keyring.active_kid}
    return f"{b64json(header)}.{b64json(s.claims().payload())}.", "alg value is not allowed"


def forge_alg_none_without_kid(s: Scene) -> tuple[str, str]:
    return f"{b64json({'alg': 'none'})}.{b64json(s.claims().payload())}.", "unknown key"


def forge_hs256_with_public_pem(s: Scene) -> tuple[str, str]:
    pem = s.signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": s.keyring.active_kid}
    return hs256(header, s.claims().payload(), pem), "alg value is not allowed"


def forge_hs256_with_public_jwk(s: Scene) -> tuple[str, str]:
    (jwk,) = [k for k in json.loads(s.jwks_json())["keys"] if k["kid"] == s.keyring.active_kid]
    header = {"alg": "HS256", "typ": "JWT", "kid": jwk["kid"]}
    secret = json.dumps(jwk, separators=(",", ":")).encode()
    return hs256(header, s.claims().payload(), secret), "alg value is not allowed"


def forge_unknown_kid(s: Scene) -> tuple[str, str]:
    attacker = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(
        s.claims().payload(), attacker, algorithm=ALGORITHM, headers={"kid": "attacker-key"}
    )
    return token, "unknown key"


def forge_own_key_with_real_kid(s: Scene) -> tuple[str, str]:
    attacker = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(
        s.claims().payload(), attacker, algorithm=ALGORITHM, headers={"kid": s.keyring.active_kid}
    )
    return token, "signature verification failed"


def forge_tampered_payload(s: Scene) -> tuple[str, str]:
    header, _, signature = s.token.split(".")
    payload = json.loads(unb64(s.token.split(".")[1]))
    payload["sub"] = "u-someoneelse0000"
    return f"{header}.{b64json(payload)}.{signature}", "signature verification failed"


def forge_expired(s: Scene) -> tuple[str, str]:
    claims = s.claims()
    s.broker.clock.advance(claims.expires_at - claims.issued_at + 1)
    return s.token, "expired"


def forge_wrong_issuer(s: Scene) -> tuple[str, str]:
    claims = replace(s.claims(), issuer="spiffe://camera.local/not-the-broker")
    return s.keyring.sign(claims), "invalid issuer"


def forge_missing_cnf(s: Scene) -> tuple[str, str]:
    payload = s.claims().payload()
    del payload["cnf"]
    token = jwt.encode(
        payload, s.signing_key, algorithm=ALGORITHM, headers={"kid": s.keyring.active_kid}
    )
    return token, "cnf"


def forge_cnf_not_an_object(s: Scene) -> tuple[str, str]:
    payload = s.claims().payload()
    payload["cnf"] = s.user.thumbprint
    token = jwt.encode(
        payload, s.signing_key, algorithm=ALGORITHM, headers={"kid": s.keyring.active_kid}
    )
    return token, "malformed"


def forge_other_scope(s: Scene) -> tuple[str, str]:
    return s.keyring.sign(replace(s.claims(), scope="stream:admin")), "scope"


def forge_long_lifetime(s: Scene) -> tuple[str, str]:
    claims = s.claims()
    return s.keyring.sign(replace(claims, expires_at=claims.issued_at + 3600)), "5 minutes"


def forge_audience_list(s: Scene) -> tuple[str, str]:
    """aud as an array naming camera X and another camera: PyJWT accepts it if any entry matches,
    so the verifier itself must insist on exactly its audience."""
    payload = s.claims().payload()
    payload["aud"] = [device_spiffe(CAM_X), device_spiffe(CAM_Y)]
    token = jwt.encode(
        payload, s.signing_key, algorithm=ALGORITHM, headers={"kid": s.keyring.active_kid}
    )
    return token, "audience"


FORGERIES = [
    forge_alg_none,
    forge_alg_none_without_kid,
    forge_hs256_with_public_pem,
    forge_hs256_with_public_jwk,
    forge_unknown_kid,
    forge_own_key_with_real_kid,
    forge_tampered_payload,
    forge_expired,
    forge_wrong_issuer,
    forge_missing_cnf,
    forge_cnf_not_an_object,
    forge_other_scope,
    forge_long_lifetime,
    forge_audience_list,
]


@pytest.mark.parametrize("forge", FORGERIES, ids=lambda f: f.__name__.removeprefix("forge_"))
def test_i5_forged_token_refused_by_both_verifiers(scene, forge):
    """I5: the genuine token passes the broker (JWKS verifier and verify_for_watch) and camera X;
    each forgery is refused by all three, for the reason it is forged."""
    for check in scene.verify_everywhere(scene.token):
        assert check().session_id == scene.session_id
    token, reason = forge(scene)
    for check in scene.verify_everywhere(token):
        assert_refused(check, reason)
    rows = session_rows(scene.broker, CAM_X)
    assert [(r.session_id, r.outcome) for r in rows] == [(scene.session_id, SessionOutcome.OPENED)]


# -- I5: bound to the camera and to the app certificate -------------------------------------------


def test_i5_token_for_camera_x_refused_by_camera_y(scene):
    """I5: camera Y's own verifier refuses a genuine token minted for camera X."""
    claims = scene.camera_x.token_verifier(scene.broker.clock).verify(scene.token)
    assert claims.audience == device_spiffe(CAM_X)
    verifier_y = scene.camera_y.token_verifier(scene.broker.clock)
    assert_refused(lambda: verifier_y.verify(scene.token), "audience")


def test_i5_token_bound_to_app_certificate(scene):
    """I5 (RFC 8705 cnf): a token minted for app instance X is refused when presented by app
    instance Y of the same user, by X's identity with Y's certificate, by Y claiming X's
    thumbprint, by X's renewed certificate, and over the real Watch RPC from Y."""
    broker = scene.broker
    sessions = broker.server.runtime.sessions
    x = scene.user
    y = enroll_app(broker, "anna", PASSWORD)
    assert y.user_id == x.user_id and y.app_id != x.app_id

    def watch_check(caller: AppCreds, identity: Identity | None = None) -> Callable[[], object]:
        return lambda: sessions.verify_for_watch(
            identity or caller.identity, caller.thumbprint, scene.session_id, scene.token
        )

    assert watch_check(x)().cnf_thumbprint == x.thumbprint
    assert_refused(watch_check(y), "another app certificate")
    assert_refused(
        lambda: sessions.verify_for_watch(x.identity, y.thumbprint, scene.session_id, scene.token),
        "another app certificate",
    )
    assert_refused(
        lambda: sessions.verify_for_watch(y.identity, x.thumbprint, scene.session_id, scene.token),
        "another app instance",
    )

    with y.channel(broker) as channel:
        stream = app_pb2_grpc.AppServiceStub(channel).Watch(
            app_pb2.WatchRequest(
                session_id=scene.session_id,
                token=scene.token,
                app_ephemeral_public_key=b"\x01" * 32,
            ),
            timeout=10,
        )
        error = rpc_error(list, stream)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED

    renewed = renew_app(broker, x)
    assert_refused(watch_check(renewed), "another app certificate")
    rows = session_rows(broker, CAM_X)
    assert [(r.session_id, r.outcome) for r in rows] == [(scene.session_id, SessionOutcome.OPENED)]


def test_i4_watch_rechecks_the_grant(scene):
    """I4: an unexpired token of a viewer is refused at Watch once the share has expired (grant
    re-read from the store), and once the share is revoked (session ended)."""
    broker = scene.broker
    sessions = broker.server.runtime.sessions
    now = int(broker.clock.now().timestamp())
    vera = new_user(broker, "vera")
    ben = new_user(broker, "ben00")
    share_device(broker, scene.user, CAM_X, "vera", now + 30)
    share_device(broker, scene.user, CAM_X, "ben00")
    vera_session = open_session(broker, vera, CAM_X)
    ben_session = open_session(broker, ben, CAM_X)

    broker.clock.advance(31)  # vera's token is still valid (5 min), her share is not
    assert_refused(
        lambda: sessions.verify_for_watch(
            vera.identity, vera.thumbprint, vera_session.session_id, vera_session.token
        ),
        "expired",
    )
    app_call(
        broker,
        scene.user,
        "RevokeShare",
        app_pb2.RevokeShareRequest(device_id=CAM_X, username="ben00"),
    )
    assert_refused(
        lambda: sessions.verify_for_watch(
            ben.identity, ben.thumbprint, ben_session.session_id, ben_session.token
        ),
        "no open session",
    )


# -- I9: operators and devices never reach AppService ---------------------------------------------


def every_app_rpc() -> list[tuple[str, Any, bool]]:
    """(path, request class, server-streaming) for every RPC AppService declares."""
    service = app_pb2.DESCRIPTOR.services_by_name["AppService"]
    return [
        (
            f"/{service.full_name}/{m.name}",
            message_factory.GetMessageClass(m.input_type),
            m.server_streaming,
        )
        for m in service.methods
    ]


def call_raw(channel: grpc.Channel, path: str, request: Any, streaming: bool) -> grpc.RpcError:
    kwargs = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": lambda raw: raw,
    }
    if streaming:
        return rpc_error(lambda: list(channel.unary_stream(path, **kwargs)(request, timeout=10)))
    return rpc_error(channel.unary_unary(path, **kwargs), request, timeout=10)


def plausible_request(cls: Any, scene: Scene) -> Any:
    """A request as a legitimate owner would send it (real device, real code, real token)."""
    values = {
        "device_id": CAM_X,
        "claim_code": scene.camera_x.state.claim_code,
        "username": "anna",
        "app_ephemeral_public_key": b"\x01" * 32,
        "session_id": scene.session_id,
        "token": scene.token,
    }
    fields = {f.name for f in cls.DESCRIPTOR.fields}
    return cls(**{k: v for k, v in values.items() if k in fields})


def test_i9_operator_certificate_cannot_call_any_app_rpc(scene, operator_channel):
    """I9/I3: the operator certificate gets PERMISSION_DENIED from every AppService RPC
    (OpenSession and Watch above all), even with real device ids, codes and tokens; no session,
    grant or app row is written."""
    sessions_before = session_rows(scene.broker, CAM_X)
    rpcs = every_app_rpc()
    assert {p.rsplit("/", 1)[1] for p, _, _ in rpcs} >= {"OpenSession", "Watch", "ClaimDevice"}
    for path, cls, streaming in rpcs:
        error = call_raw(operator_channel, path, plausible_request(cls, scene), streaming)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED, path
    assert session_rows(scene.broker, CAM_X) == sessions_before
    assert count_rows(scene.broker, "grants") == 1
    assert count_rows(scene.broker, "app_instances") == 1


def test_i9_core_never_opens_a_session_for_an_operator(scene):
    """I9 below the transport: Sessions.open refuses operator and device identities outright."""
    sessions = scene.broker.server.runtime.sessions
    for identity in (
        Identity(Kind.OPERATOR, "camera.local", "admin"),
        Identity(Kind.DEVICE, "camera.local", CAM_X),
    ):
        assert_refused(
            lambda identity=identity: sessions.open(identity, "x", CAM_X, b"\x01" * 32),
            "only for app instances",
        )
    assert len(session_rows(scene.broker, CAM_X)) == 1


def test_device_certificate_cannot_call_app_rpcs(broker, operator_channel):
    """I3: a camera's certificate gets PERMISSION_DENIED from every AppService RPC; it cannot
    claim itself with its own code (the code stays valid) nor open a session on itself."""
    camera, code = enroll_camera(broker, operator_channel, CAM_Y)
    with camera.channel(broker) as channel:
        for path, cls, streaming in every_app_rpc():
            fields = {f.name for f in cls.DESCRIPTOR.fields}
            values = {
                "device_id": CAM_Y,
                "claim_code": code,
                "app_ephemeral_public_key": b"\x01" * 32,
            }
            request = cls(**{k: v for k, v in values.items() if k in fields})
            error = call_raw(channel, path, request, streaming)
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED, path
    assert session_rows(broker, CAM_Y) == []
    assert count_rows(broker, "grants") == 0
    assert claim_code_hash_of(broker, CAM_Y) is not None
    owner = new_user(broker, "anna")
    app_call(
        broker, owner, "ClaimDevice", app_pb2.ClaimDeviceRequest(device_id=CAM_Y, claim_code=code)
    )
