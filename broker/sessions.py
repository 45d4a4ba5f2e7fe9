"""Stream sessions: open (grant check + token), and the broker-side token check (I4, I5, I9)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from broker.audit import AuditEvent
from broker.clock import Clock, unix
from broker.config import Config
from broker.errors import InvalidArgument, PermissionDenied
from broker.identity import Identity, Kind, device, validate_device_id
from broker.ownership import require_grant
from broker.store import SessionOutcome, SessionRecord, Store
from broker.tokens import SCOPE_VIEW, SessionClaims, TokenKeyring, TokenVerifier, key_hash

X25519_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class OpenedSession:
    session_id: str
    token: str
    expires_at: int


class Sessions:
    """Mints session tokens for granted (user, device) pairs and checks them again at Watch."""

    def __init__(self, config: Config, store: Store, clock: Clock, keyring: TokenKeyring) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._keyring = keyring
        self._verifier = TokenVerifier(keyring.jwks_json(), config.broker_spiffe_id, clock)

    def open(
        self, caller: Identity, cnf_thumbprint: str, device_id: str, app_ephemeral_key: bytes
    ) -> OpenedSession:
        """Record a session for (caller's user, device) and mint its token; deny without a grant."""
        if caller.kind is not Kind.APP:  # I9: operators and devices never get sessions
            raise PermissionDenied("sessions are only for app instances")
        validate_device_id(device_id)
        if len(app_ephemeral_key) != X25519_KEY_BYTES:
            raise InvalidArgument(
                "app_ephemeral_public_key must be a raw 32-byte X25519 public key"
            )
        now = unix(self._clock.now())
        session_id = "s-" + secrets.token_hex(12)
        expires_at = now + self._config.session_token_ttl_seconds
        record = SessionRecord(
            session_id,
            device_id,
            caller.name,
            caller.app_id,
            now,
            expires_at,
            SessionOutcome.OPENED,
            "",
            cnf_thumbprint,
        )
        at_ms = int(self._clock.now().timestamp() * 1000)
        with self._store.transaction() as tx:
            try:
                require_grant(tx, caller.name, device_id, now)
            except PermissionDenied as denied:
                denial = denied
            else:
                tx.insert_session(record)
                tx.append_audit(
                    AuditEvent(
                        caller.spiffe_id,
                        "session.opened",
                        device_id,
                        {"session_id": session_id, "user_id": caller.name, "app_id": caller.app_id},
                    ),
                    at_ms,
                )
                claims = SessionClaims(
                    issuer=self._config.broker_spiffe_id,
                    user_id=caller.name,
                    audience=device(self._config.trust_domain, device_id).spiffe_id,
                    session_id=session_id,
                    scope=SCOPE_VIEW,
                    issued_at=now,
                    expires_at=expires_at,
                    cnf_thumbprint=cnf_thumbprint,
                    ephemeral_key_hash=key_hash(app_ephemeral_key),
                    app_id=caller.app_id,
                )
                return OpenedSession(session_id, self._keyring.sign(claims), expires_at)
        with self._store.transaction() as tx:
            tx.insert_session(
                SessionRecord(
                    session_id,
                    device_id,
                    caller.name,
                    caller.app_id,
                    now,
                    now,
                    SessionOutcome.DENIED,
                    denial.message,
                    cnf_thumbprint,
                )
            )
            tx.append_audit(
                AuditEvent(
                    caller.spiffe_id,
                    "session.denied",
                    device_id,
                    {"session_id": session_id, "user_id": caller.name, "reason": denial.message},
                ),
                at_ms,
            )
        raise denial

    def verify_for_watch(
        self, caller: Identity, cnf_thumbprint: str, session_id: str, token: str
    ) -> SessionClaims:
        """Broker-side check before a stream starts: signature (pinned alg), iss, exp, audience,
        cnf = the presenting certificate, the session record, and the grant, all re-read (I4, I5)."""
        if caller.kind is not Kind.APP:
            raise PermissionDenied("sessions are only for app instances")
        with self._store.read() as tx:
            record = tx.get_session(session_id)
        if record is None or record.outcome is not SessionOutcome.OPENED:
            raise PermissionDenied("no open session with that id")
        claims = self._verifier.verify(
            token, device(self._config.trust_domain, record.device_id).spiffe_id
        )
        if claims.session_id != session_id:
            raise PermissionDenied("token was minted for another session")
        if claims.cnf_thumbprint != cnf_thumbprint or record.cnf_thumbprint != cnf_thumbprint:
            raise PermissionDenied("token is bound to another app certificate")
        if claims.user_id != caller.name or claims.app_id != caller.app_id:
            raise PermissionDenied("token was minted for another app instance")
        with self._store.read() as tx:
            require_grant(tx, caller.name, record.device_id, unix(self._clock.now()))
        return claims
