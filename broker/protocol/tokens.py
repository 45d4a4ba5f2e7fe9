"""Session tokens: ES256 JWTs (PyJWT) bound to user, device, app certificate and session (I5).

Signing keys live in ``certs/token-keys/`` (0600). Every published key is pinned to exactly one
algorithm (its JWK ``alg``); a verifier only ever accepts that algorithm for that ``kid``, so
``alg: none``, HS256-with-the-public-key and algorithm swaps fail by construction.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from broker.clock import Clock, unix
from broker.errors import ConfigurationError, PermissionDenied
from broker.pemfile import read_private_key, write_atomic, write_private_key

ALGORITHM = "ES256"
SCOPE_VIEW = "stream:view"
REQUIRED_CLAIMS = ("iss", "sub", "aud", "sid", "scope", "iat", "exp", "cnf", "eph", "app")
MAX_TOKEN_CHARS = 4096


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def cert_thumbprint(der: bytes, *, prehashed: bool = False) -> str:
    """RFC 8705 ``x5t#S256``: base64url SHA-256 of the certificate's DER (or of its digest)."""
    return b64url(der if prehashed else hashlib.sha256(der).digest())


def key_hash(public_key: bytes) -> str:
    """How a token names the app's ephemeral X25519 key: base64url SHA-256 of its raw bytes."""
    return b64url(hashlib.sha256(public_key).digest())


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The public JWK with ``kid`` = RFC 7638 thumbprint and the pinned ``alg``."""
    jwk: dict[str, Any] = dict(ECAlgorithm.to_jwk(key, as_dict=True))
    required = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":")).encode("ascii")
    jwk.update(kid=b64url(hashlib.sha256(canonical).digest()), alg=ALGORITHM, use="sig")
    return jwk


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """The verified content of a session token."""

    issuer: str
    user_id: str
    audience: str
    session_id: str
    scope: str
    issued_at: int
    expires_at: int
    cnf_thumbprint: str
    ephemeral_key_hash: str
    app_id: str

    def payload(self) -> dict[str, Any]:
        return {
            "iss": self.issuer,
            "sub": self.user_id,
            "aud": self.audience,
            "sid": self.session_id,
            "scope": self.scope,
            "iat": self.issued_at,
            "exp": self.expires_at,
            "cnf": {"x5t#S256": self.cnf_thumbprint},
            "eph": self.ephemeral_key_hash,
            "app": self.app_id,
        }


class TokenKeyring:
    """Signing keys on disk: one active key, plus older keys still published in the JWKS."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._index_path = directory / "keys.json"
        if not self._index_path.exists():
            raise ConfigurationError(f"no token keys in {directory}: run `broker ca init`")
        index = json.loads(self._index_path.read_text())
        self.active_kid: str = index["active"]
        self._published: dict[str, int | None] = {
            k["kid"]: k.get("retire_after") for k in index["published"]
        }
        self._keys = {kid: read_private_key(directory / f"{kid}.key") for kid in self._published}

    @staticmethod
    def ensure(directory: Path) -> bool:
        """Create the first signing key if there is none; returns whether it created one."""
        if (directory / "keys.json").exists():
            return False
        key = ec.generate_private_key(ec.SECP256R1())
        kid = public_jwk(key.public_key())["kid"]
        write_private_key(directory / f"{kid}.key", key)
        index = {"active": kid, "published": [{"kid": kid, "retire_after": None}]}
        write_atomic(directory / "keys.json", json.dumps(index, indent=2).encode())
        return True

    @staticmethod
    def rotate(directory: Path, retire_after: int, now: int) -> tuple[str, str, list[str]]:
        """Make a new active key; the old one stays published until retire_after. Keys whose
        publication has ended are removed. Returns (new kid, previous kid, pruned kids)."""
        index_path = directory / "keys.json"
        index = json.loads(index_path.read_text())
        previous = index["active"]
        key = ec.generate_private_key(ec.SECP256R1())
        kid = public_jwk(key.public_key())["kid"]
        write_private_key(directory / f"{kid}.key", key)
        published = []
        pruned = []
        for entry in index["published"]:
            if entry["kid"] == previous:
                entry["retire_after"] = retire_after
            if entry.get("retire_after") is not None and entry["retire_after"] < now:
                pruned.append(entry["kid"])
                (directory / f"{entry['kid']}.key").unlink(missing_ok=True)
                continue
            published.append(entry)
        published.append({"kid": kid, "retire_after": None})
        write_atomic(
            index_path, json.dumps({"active": kid, "published": published}, indent=2).encode()
        )
        return kid, previous, pruned

    def jwks(self) -> dict[str, Any]:
        """Public keys of every published kid."""
        return {
            "keys": [public_jwk(self._keys[kid].public_key()) for kid in sorted(self._published)]
        }

    def jwks_json(self) -> str:
        return json.dumps(self.jwks(), sort_keys=True, separators=(",", ":"))

    def sign(self, claims: SessionClaims) -> str:
        """A compact JWS of claims with the active key."""
        return jwt.encode(
            claims.payload(),
            self._keys[self.active_kid],
            algorithm=ALGORITHM,
            headers={"kid": self.active_kid, "typ": "JWT"},
        )


class TokenVerifier:
    """Verifies session tokens against a JWKS: pinned algorithm per kid, issuer, audience, expiry."""

    def __init__(self, jwks_json: str, issuer: str, clock: Clock) -> None:
        self._issuer = issuer
        self._clock = clock
        self._keys: dict[str, tuple[Any, str]] = {}
        for entry in json.loads(jwks_json or '{"keys": []}').get("keys", []):
            if entry.get("alg") != ALGORITHM or entry.get("kty") != "EC" or "kid" not in entry:
                continue  # only keys pinned to our one algorithm are ever trusted
            self._keys[entry["kid"]] = (jwt.PyJWK(entry, algorithm=ALGORITHM).key, ALGORITHM)

    def verify(self, token: str, audience: str) -> SessionClaims:
        """The token's claims, or PermissionDenied saying why it is refused."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise PermissionDenied("session token missing or too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise PermissionDenied("session token is malformed") from None
        pinned = self._keys.get(str(header.get("kid", "")))
        if pinned is None:
            raise PermissionDenied("session token signed by an unknown key")
        key, algorithm = pinned
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=audience,
                issuer=self._issuer,
                options={"require": list(REQUIRED_CLAIMS), "verify_iat": False},
            )
        except jwt.PyJWTError as error:
            raise PermissionDenied(f"session token refused: {error}") from None
        # PyJWT accepts an aud array if any entry matches; a session token names exactly one device.
        if payload.get("aud") != audience:
            raise PermissionDenied("session token audience is not exactly this device")
        return self._checked(payload)

    def _checked(self, payload: dict[str, Any]) -> SessionClaims:
        now = unix(self._clock.now())
        try:
            claims = SessionClaims(
                issuer=str(payload["iss"]),
                user_id=str(payload["sub"]),
                audience=str(payload["aud"]),
                session_id=str(payload["sid"]),
                scope=str(payload["scope"]),
                issued_at=int(payload["iat"]),
                expires_at=int(payload["exp"]),
                cnf_thumbprint=str(payload["cnf"]["x5t#S256"]),
                ephemeral_key_hash=str(payload["eph"]),
                app_id=str(payload["app"]),
            )
        except (KeyError, TypeError, ValueError):
            raise PermissionDenied("session token claims are malformed") from None
        # Our own clock too (tests move it); PyJWT checked exp against the wall clock.
        if claims.expires_at <= now:
            raise PermissionDenied("session token has expired")
        if claims.issued_at > now + 60:
            raise PermissionDenied("session token is issued in the future")
        if claims.expires_at - claims.issued_at > 300:
            raise PermissionDenied("session token lifetime exceeds 5 minutes")
        if claims.scope != SCOPE_VIEW:
            raise PermissionDenied("session token scope is not stream:view")
        return claims


def load_keyring(certs_dir: Path) -> TokenKeyring:
    """The keyring under certs/token-keys (created on first use)."""
    TokenKeyring.ensure(certs_dir / "token-keys")
    return TokenKeyring(certs_dir / "token-keys")
