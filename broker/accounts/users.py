"""Users and app instances: sign-up, password login, app-instance certificates, sign-out.

Core logic, no transport. Login is split from issuance so the slow argon2 check runs off the
thread that serialises store writes.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass

from broker.accounts.passwords import PasswordHasher, check_password_policy
from broker.accounts.ratelimit import LoginAdmission, LoginRefused, login_limits
from broker.audit.chain import AuditEvent
from broker.audit.recorder import AuditRecorder
from broker.audit.session_ends import end_sessions_audited
from broker.clock import Clock, now_ms, now_s
from broker.cluster.events import EFFECTS, effects_to_payload
from broker.config import Config
from broker.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from broker.identity.spiffe import Identity, Kind
from broker.outcomes import Effects, EndSessions
from broker.pki.ca import IssuedCertificate, IssuingAuthority
from broker.pki.certbook import CertificateBook, Presigned, presign, signed_for
from broker.pki.csr import PublicKey, public_key_from_csr
from broker.store import (
    AppRecord,
    AppState,
    Store,
    Transaction,
    UserRecord,
)

USERNAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._@+-]{2,63}$")
MAX_LABEL = 64
LOGIN_FAILED = "username or password is wrong"


def normalize_username(username: str) -> str:
    """Case-folded NFKC username, validated; raises InvalidArgument."""
    name = unicodedata.normalize("NFKC", username).strip().lower()
    if not USERNAME_PATTERN.fullmatch(name):
        raise InvalidArgument("username must be 3-64 characters of a-z, 0-9 and . _ @ + -")
    return name


def new_id(prefix: str) -> str:
    """A random id in the safe alphabet, e.g. ``u-3f9a...``."""
    return f"{prefix}-{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class AppEnrollment:
    identity: Identity
    issued: IssuedCertificate


KEY_TAKEN = "this public key already belongs to another identity: make a new key"


@dataclass(frozen=True, slots=True)
class AppRevoked:
    """Outcome of revoking an app instance (or its sign-out)."""

    user_id: str
    sessions_ended: tuple[str, ...]
    effects: Effects


class Accounts:
    """Who the users are and which app instances speak for them."""

    def __init__(
        self,
        config: Config,
        ca: IssuingAuthority,
        store: Store,
        clock: Clock,
        hasher: PasswordHasher,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._recorder = AuditRecorder(clock)
        self._certs = CertificateBook(clock, self._recorder)
        self._ca = ca
        self._hasher = hasher
        self._login = login_limits(config, self._recorder.append)

    # -- sign-up ---------------------------------------------------------------------------------
    def create_account(self, username: str, password: str) -> str:
        """Create a user; returns its user_id. Slow (argon2): run off the store thread."""
        if not self._config.allow_signup:
            raise FailedPrecondition("account sign-up is switched off on this broker")
        name = normalize_username(username)
        check_password_policy(password)
        password_hash = self._hasher.hash(password)
        user_id = new_id("u")

        def unit(tx: Transaction) -> None:
            if tx.get_user_by_username(name) is not None:
                raise AlreadyExists("that username is taken")
            tx.insert_user(UserRecord(user_id, name, password_hash, now_s(self._clock)))
            self._recorder.append(
                tx, AuditEvent("anonymous", "user.created", user_id, {"username": name})
            )

        self._store.run(unit)
        return user_id

    # -- login -----------------------------------------------------------------------------------
    def admit_login(self, username: str, peer: str) -> LoginAdmission:
        """Step 1 of a login, before the password is looked at (fast, one transaction): the
        attempt is admitted, possibly after a wait (its address's reserved slot; the caller
        waits without holding a thread or a transaction), or refused RESOURCE_EXHAUSTED with a
        retry delay (counted in the throttled-attempt audit). Scheme: broker.accounts.ratelimit."""
        try:
            name = normalize_username(username)
        except InvalidArgument:
            name = ""  # admitted like any name, fails like a wrong password
        # the clock is read inside the unit: a unit that waited for the writer (or is re-run)
        # reserves its slot from the time it actually runs
        outcome = self._store.run(lambda tx: self._login.admit(tx, name, peer, now_ms(self._clock)))
        if isinstance(outcome, LoginRefused):
            raise ResourceExhausted(outcome.message, outcome.retry_seconds, limit=outcome.limit)
        return outcome

    def verify_login(self, admission: LoginAdmission, password: str) -> UserRecord:
        """Step 2: the user whose password this is, or Unauthenticated. Slow (argon2): run off
        the store thread. Unknown users and wrong passwords get the same error and cost."""
        name = admission.name
        with self._store.read() as tx:
            user = tx.get_user_by_username(name) if name else None
        ok = self._hasher.verify(user.password_hash if user else None, password)
        ok = ok and user is not None

        def finish(tx: Transaction) -> None:
            self._login.finish(tx, admission, now_ms(self._clock), ok=ok)
            if not ok:
                detail: dict[str, object] = {"peer": admission.peer}
                if admission.wait_seconds:
                    detail["slowed_ms"] = int(admission.wait_seconds * 1000)
                self._recorder.append(
                    tx, AuditEvent("anonymous", "user.login.denied", name, detail)
                )

        self._store.run(finish)
        if user is None or not ok:
            raise Unauthenticated(LOGIN_FAILED)
        return user

    def authenticate(self, username: str, password: str, peer: str) -> UserRecord:
        """admit_login, its wait (a sleep on the calling thread: never call this on the core
        thread or an event loop; the gRPC service awaits the wait instead), verify_login."""
        admission = self.admit_login(username, peer)
        if admission.wait_seconds > 0:
            time.sleep(admission.wait_seconds)
        return self.verify_login(admission, password)

    def flush_login_audit(self) -> int:
        """Summarize throttled-attempt windows that are over (also done by login attempts);
        returns how many were closed."""
        now = now_ms(self._clock)
        return self._store.run(lambda tx: self._login.audit.flush(tx, now, force=True))

    # -- app instances -----------------------------------------------------------------------
    def prepare_app_certificate(self, identity: Identity, csr_pem: str) -> Presigned:
        """Check the CSR and sign identity's app certificate, off the store's thread; the
        transaction that records it (issue_app_certificate, renew_app) may still refuse it."""
        key = public_key_from_csr(csr_pem)
        lifetime = dt.timedelta(days=self._config.app_cert_days)
        return presign(self._ca, identity, key, lifetime)

    def new_app_identity(self, user_id: str) -> Identity:
        """The identity of an app instance about to be enrolled for user_id."""
        return Identity(Kind.APP, self._config.trust_domain, user_id, new_id("a"))

    def issue_app_certificate(
        self, user: UserRecord, prepared: Presigned, label: str
    ) -> AppEnrollment:
        """A new app instance for an authenticated user, with its 7-day certificate (prepared
        for a new_app_identity of this user)."""
        identity, key = prepared.identity, prepared.key
        if identity.kind is not Kind.APP or identity.name != user.user_id:
            raise ValueError("prepared certificate is not for a new app of this user")  # a bug
        label = check_label(label)
        app_id = identity.app_id

        def unit(tx: Transaction) -> IssuedCertificate:
            if not self._certs.key_is_free(tx, key, identity):
                raise PermissionDenied(KEY_TAKEN)
            tx.insert_app(
                AppRecord(app_id, user.user_id, label, AppState.ACTIVE, now_s(self._clock))
            )
            issued = self._issue(tx, identity, key, prepared)
            self._recorder.append(
                tx,
                AuditEvent(
                    identity.spiffe_id,
                    "app.enrolled",
                    user.user_id,
                    {"app_id": app_id, "serial": issued.serial, "label": label},
                ),
            )
            return issued

        try:
            return AppEnrollment(identity, self._store.run(unit))
        except PermissionDenied:  # the one refusal unit raises: the key is taken
            self._audit_key_reuse(identity, "app.enroll.denied", user.user_id)
            raise

    def renew_app(self, caller: Identity, prepared: Presigned) -> IssuedCertificate:
        """A new certificate for the calling app instance (prepare_app_certificate(caller, ..));
        the old one is superseded."""
        key = prepared.key

        def unit(tx: Transaction) -> IssuedCertificate:
            app = tx.get_app(caller.app_id)
            if app is None or app.state is not AppState.ACTIVE or app.user_id != caller.name:
                raise Unauthenticated("app instance is signed out or revoked")
            return self._certs.renew(
                tx,
                self._ca,
                caller,
                key,
                dt.timedelta(days=self._config.app_cert_days),
                caller.app_id,
                KEY_TAKEN,
                prepared,
            )

        try:
            return self._store.run(unit)
        except PermissionDenied:  # the one refusal unit raises: the key is taken
            self._audit_key_reuse(caller, "certificate.renew.denied", caller.app_id)
            raise

    def _audit_key_reuse(self, identity: Identity, action: str, subject: str) -> None:
        """Audit a refusal for a key another identity holds, in its own transaction (the refused
        one rolled back); the fleet audit reports these as key reuse."""
        event = AuditEvent(
            identity.spiffe_id, action, subject, {"reason": "key bound to another identity"}
        )
        self._store.run(lambda tx: self._recorder.append(tx, event))

    def _issue(
        self, tx: Transaction, identity: Identity, key: PublicKey, prepared: Presigned
    ) -> IssuedCertificate:
        lifetime = dt.timedelta(days=self._config.app_cert_days)
        issued = signed_for(self._ca, identity, key, lifetime, prepared)
        self._certs.record_issued(tx, identity, issued, key)
        return issued

    def revoke_app_by_id(self, actor: Identity, app_id: str, reason: str) -> AppRevoked:
        """Operator revocation of an app instance by id."""
        from broker.protocol.spiffe_id import ID_PATTERN

        if not ID_PATTERN.fullmatch(app_id):
            raise InvalidArgument("app_id must be 3-64 characters of a-z, 0-9 and '-'")
        with self._store.read() as tx:
            app = tx.get_app(app_id)
        if app is None:
            raise NotFound(f"no app instance {app_id}")
        return self.revoke_app(actor, app.user_id, app_id, reason or "revoked by operator")

    def revoke_app(self, actor: Identity, user_id: str, app_id: str, reason: str) -> AppRevoked:
        """Revoke an app instance and its certificates (sign-out when actor is the app itself);
        its live sessions end."""
        now = now_s(self._clock)
        spiffe = Identity(Kind.APP, self._config.trust_domain, user_id, app_id).spiffe_id

        live_reason = (
            "app instance signed out" if actor.spiffe_id == spiffe else "app instance revoked"
        )

        def unit(tx: Transaction) -> AppRevoked:
            app = tx.get_app(app_id)
            if app is None or app.user_id != user_id:
                raise Unauthenticated("no such app instance")
            if app.state is not AppState.ACTIVE:
                raise FailedPrecondition("app instance is already revoked")
            tx.revoke_app(app_id, now)
            serials = tx.revoke_certificates(spiffe, now, reason)
            open_ids = [s.session_id for s in tx.open_sessions(app_id=app_id)]
            ended = end_sessions_audited(
                tx, open_ids, now, now_ms(self._clock), reason, actor.spiffe_id
            )
            self._recorder.append(
                tx,
                AuditEvent(
                    actor.spiffe_id,
                    "app.revoked",
                    app_id,
                    {
                        "user_id": user_id,
                        "serials": serials,
                        "reason": reason,
                        "sessions_ended": ended,
                    },
                ),
            )
            effects = Effects(
                end_sessions=(EndSessions(live_reason, tuple(ended), app_id=app_id),),
                revocations_changed=True,
            )
            # Every other replica ends this app's sessions too (same transaction as the change).
            tx.append_event(
                EFFECTS, effects_to_payload(effects), self._config.replica_name, now_ms(self._clock)
            )
            return AppRevoked(user_id, tuple(ended), effects)

        return self._store.run(unit)


def check_label(label: str) -> str:
    """A printable label of at most 64 characters."""
    if len(label) > MAX_LABEL or not label.isprintable():
        raise InvalidArgument(f"label must be at most {MAX_LABEL} printable characters")
    return label
