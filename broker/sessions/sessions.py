"""Stream sessions: open (grant check + token), and the broker-side token check (I4, I5, I9)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.audit.chain import AuditEvent
from broker.audit.session_ends import end_sessions_audited
from broker.clock import Clock, unix
from broker.config import Config
from broker.devices.ownership import require_grant
from broker.errors import InvalidArgument, PermissionDenied
from broker.identity.spiffe import Identity, Kind, device, validate_device_id
from broker.protocol.tokens import SCOPE_VIEW, SessionClaims, TokenKeyring, TokenVerifier, key_hash
from broker.store import Role, SessionOutcome, SessionRecord, Store, Transaction

X25519_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """One line of the owner's access log."""

    session_id: str
    user_id: str
    username: str
    app_id: str
    app_label: str
    started_at: int
    ended_at: int
    outcome: str
    reason: str
    bytes: int


@dataclass
class _AccessRow:
    """One session's access-log line, folded from its audit entries in order."""

    user_id: str = ""
    app_id: str = ""
    started_at: int = 0
    ended_at: int = 0
    outcome: str = "opened"
    reason: str = ""
    bytes: int = 0

    def add(self, action: str, detail: Mapping[str, Any], at: int) -> None:
        if action in ("session.opened", "session.denied"):
            self.user_id = str(detail.get("user_id", ""))
            self.app_id = str(detail.get("app_id", ""))
            self.started_at = at
        if action == "session.denied":
            self.outcome, self.reason = "denied", str(detail.get("reason", ""))
        if action in ("session.ended", "session.closed") and self.outcome != "denied":
            if not self.ended_at:
                self.ended_at, self.reason = at, str(detail.get("reason", ""))
            self.outcome = "ended"
            self.bytes += int(detail.get("bytes", 0))


@dataclass(frozen=True, slots=True)
class OpenedSession:
    session_id: str
    token: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class MintedSession:
    """A validated OpenSession with its signed token, not yet recorded (the token must not
    leave the broker unless record_opened succeeds)."""

    caller: Identity
    record: SessionRecord
    token: str
    at_ms: int


class Sessions:
    """Mints session tokens for granted (user, device) pairs and checks them again at Watch."""

    def __init__(self, config: Config, store: Store, clock: Clock, keyring: TokenKeyring) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._keyring = keyring
        self._verifier = TokenVerifier(keyring.jwks_json(), config.broker_spiffe_id, clock)

    def reload_keyring(self, keyring: TokenKeyring) -> None:
        """Sign with the rotated active key; verify against every published key."""
        self._keyring = keyring
        self._verifier = TokenVerifier(
            keyring.jwks_json(), self._config.broker_spiffe_id, self._clock
        )

    def open(
        self, caller: Identity, cnf_thumbprint: str, device_id: str, app_ephemeral_key: bytes
    ) -> OpenedSession:
        """Record a session for (caller's user, device) and mint its token; deny without a grant."""
        return self.record_opened(self.mint(caller, cnf_thumbprint, device_id, app_ephemeral_key))

    def mint(
        self, caller: Identity, cnf_thumbprint: str, device_id: str, app_ephemeral_key: bytes
    ) -> MintedSession:
        """Validate an OpenSession request and sign its token, without touching the store (runs
        off the writer thread). The token is handed out only by record_opened, once the grant
        is checked and the session recorded."""
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
            replica=self._config.replica_name,
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
        at_ms = int(self._clock.now().timestamp() * 1000)
        return MintedSession(caller, record, self._keyring.sign(claims), at_ms)

    def record_opened(self, minted: MintedSession) -> OpenedSession:
        """The store half of OpenSession (writer thread): check the grant, record the session and
        its audit entry, and only then release the token; a denial is recorded and raised."""
        caller, record, at_ms = minted.caller, minted.record, minted.at_ms
        session_id, device_id, now = record.session_id, record.device_id, record.opened_at

        def opening(tx: Transaction) -> OpenedSession | PermissionDenied:
            try:
                require_grant(tx, caller.name, device_id, now)
            except PermissionDenied as denied:
                return denied
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
            return OpenedSession(session_id, minted.token, record.expires_at)

        opened = self._store.run(opening)
        if isinstance(opened, OpenedSession):
            return opened
        denial = opened

        def refusal(tx: Transaction) -> None:
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
                    record.cnf_thumbprint,
                )
            )
            tx.append_audit(
                AuditEvent(
                    caller.spiffe_id,
                    "session.denied",
                    device_id,
                    {
                        "session_id": session_id,
                        "user_id": caller.name,
                        "app_id": caller.app_id,
                        "reason": denial.message,
                    },
                ),
                at_ms,
            )

        self._store.run(refusal)
        raise denial

    def verify_for_watch(
        self,
        caller: Identity,
        cnf_thumbprint: str,
        session_id: str,
        token: str,
        app_ephemeral_key: bytes | None = None,
    ) -> SessionClaims:
        """Broker-side check before a stream starts: signature (pinned alg), iss, exp, audience,
        cnf = the presenting certificate, the app key named by the token, the session record, and
        the grant, all re-read (I4, I5)."""
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
        if (
            app_ephemeral_key is not None
            and key_hash(app_ephemeral_key) != claims.ephemeral_key_hash
        ):
            raise PermissionDenied(
                "app_ephemeral_public_key is not the key this session was opened with"
            )
        with self._store.read() as tx:
            require_grant(tx, caller.name, record.device_id, unix(self._clock.now()))
        return claims

    def record_close(
        self, session_id: str, reason: str, byte_count: int, frames: int, dropped: int
    ) -> None:
        """A watched stream finished: store its traffic and audit the close."""
        now = unix(self._clock.now())

        def closing(tx: Transaction) -> None:
            record = tx.get_session(session_id)
            if record is None:
                return
            tx.close_session(session_id, now, reason, byte_count)
            tx.append_audit(
                AuditEvent(
                    "broker",
                    "session.closed",
                    record.device_id,
                    {
                        "session_id": session_id,
                        "reason": reason,
                        "bytes": byte_count,
                        "frames": frames,
                        "dropped": dropped,
                    },
                ),
                int(self._clock.now().timestamp() * 1000),
            )

        self._store.run(closing)

    def served_here(self, session_id: str) -> None:
        """The app's Watch for this session is served by this replica: if it stops or crashes,
        its restart ends the session (DESIGN: a replica ends only its own sessions)."""
        replica = self._config.replica_name
        self._store.run(lambda tx: tx.set_session_replica(session_id, replica))

    def end(self, session_ids: list[str], reason: str) -> list[str]:
        """End these sessions, if still open, with reason (audited); the ids that were open."""
        now = unix(self._clock.now())
        at_ms = int(self._clock.now().timestamp() * 1000)
        return self._store.run(
            lambda tx: end_sessions_audited(tx, session_ids, now, at_ms, reason, "broker")
        )

    def end_all_after_restart(self) -> list[str]:
        """No session survives a restart of the replica that served it: this replica's open
        sessions are ended (apps re-open with new tokens); other replicas' are left alone."""
        now = unix(self._clock.now())
        at_ms = int(self._clock.now().timestamp() * 1000)
        replica = self._config.replica_name

        def ending(tx: Transaction) -> list[str]:
            open_ids = [r.session_id for r in tx.open_sessions() if r.replica == replica]
            return end_sessions_audited(tx, open_ids, now, at_ms, "broker restarted", "broker")

        return self._store.run(ending)

    def access_log(self, caller: Identity, device_id: str) -> list[AccessEntry]:
        """Every session opened or refused on the device, from the audit trail; owner only."""
        validate_device_id(device_id)
        with self._store.read() as tx:
            grant = tx.get_grant(device_id, caller.name)
            if grant is None or grant.role is not Role.OWNER:
                raise PermissionDenied("only the device's owner can read its access log")
            rows: dict[str, _AccessRow] = {}
            for entry in tx.audit_entries_for(device_id, "session."):
                sid = str(entry.detail.get("session_id", ""))
                rows.setdefault(sid, _AccessRow()).add(
                    entry.action, entry.detail, entry.at_ms // 1000
                )
            result = []
            for sid, row in rows.items():
                user = tx.get_user(row.user_id) if row.user_id else None
                app = tx.get_app(row.app_id) if row.app_id else None
                result.append(
                    AccessEntry(
                        sid,
                        row.user_id,
                        user.username if user else "",
                        row.app_id,
                        app.label if app else "",
                        row.started_at,
                        row.ended_at,
                        row.outcome,
                        row.reason,
                        row.bytes,
                    )
                )
            return result
