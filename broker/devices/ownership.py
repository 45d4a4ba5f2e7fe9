"""Who may see which camera: claiming, sharing, factory reset (I4, I8).

Every decision reads the store of record inside the transaction that acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.accounts.ratelimit import FailureLimiter
from broker.audit.chain import AuditEvent
from broker.audit.recorder import AuditRecorder
from broker.audit.session_ends import end_sessions_audited
from broker.clock import Clock, now_ms, now_s
from broker.cluster.events import EFFECTS, effects_to_payload
from broker.config import Config
from broker.devices.onetime import claim_code_hash, new_claim_code
from broker.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from broker.identity.spiffe import Identity, Kind, validate_device_id
from broker.outcomes import Effects, EndSessions
from broker.store import DeviceRecord, DeviceState, GrantRecord, Role, Store, Transaction

CLAIM_REFUSED = "claim code is wrong, already used, or the device is already claimed"


@dataclass(frozen=True, slots=True)
class DeviceAccess:
    """A device the user may see, and how."""

    grant: GrantRecord
    device: DeviceRecord
    online: bool = False  # a live attachment on any replica (store of record)


@dataclass(frozen=True, slots=True)
class OwnershipReset:
    """Outcome of a factory reset: the new claim code and what must end live."""

    claim_code: str
    sessions_ended: tuple[str, ...]
    effects: Effects


@dataclass(frozen=True, slots=True)
class ShareRevoked:
    """Outcome of withdrawing a share."""

    sessions_ended: tuple[str, ...]
    effects: Effects


class Ownership:
    """Grants of devices to users."""

    def __init__(self, config: Config, store: Store, clock: Clock) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._recorder = AuditRecorder(clock)
        self._claims_per_user = FailureLimiter(
            clock,
            "claim.user",
            config.claim_failures_per_user,
            config.claim_window_seconds,
            "wrong claim codes from this user",
        )
        self._claims_per_device = FailureLimiter(
            clock,
            "claim.device",
            config.claim_failures_per_device,
            config.claim_window_seconds,
            "wrong claim codes for this device",
        )

    # -- claim -----------------------------------------------------------------------------------
    def claim(self, caller: Identity, device_id: str, claim_code: str) -> None:
        """Make the caller's user the owner, if the single-use code matches (I8)."""
        validate_device_id(device_id)

        def unit(tx: Transaction) -> bool:
            # Budgets are checked and spent in the claim's own transaction: writers are
            # serialized, so concurrent wrong codes can never exceed them (I8).
            self._claims_per_user.check(tx, caller.name)
            self._claims_per_device.check(tx, device_id)
            if claim_code and tx.claim_device(device_id, claim_code_hash(claim_code)):
                tx.insert_grant(
                    GrantRecord(
                        device_id, caller.name, Role.OWNER, caller.spiffe_id, now_s(self._clock)
                    )
                )
                self._recorder.append(
                    tx,
                    AuditEvent(
                        caller.spiffe_id, "device.claimed", device_id, {"user_id": caller.name}
                    ),
                )
                return True
            self._claims_per_user.fail(tx, caller.name)
            self._claims_per_device.fail(tx, device_id)
            self._recorder.append(
                tx,
                AuditEvent(
                    caller.spiffe_id, "device.claim.denied", device_id, {"user_id": caller.name}
                ),
            )
            return False

        if self._store.run(unit):
            return
        raise PermissionDenied(CLAIM_REFUSED)

    def reset(self, device: Identity) -> OwnershipReset:
        """Factory reset: drop owner and shares, end their sessions, issue a new claim code."""
        code = new_claim_code()
        now = now_s(self._clock)

        def unit(tx: Transaction) -> OwnershipReset:
            record = tx.get_device(device.name)
            if record is None or record.state is not DeviceState.ACTIVE:
                raise FailedPrecondition("device is not active")
            dropped = tx.delete_grants(device.name)
            tx.set_claim_code_hash(device.name, claim_code_hash(code))
            open_ids = [s.session_id for s in tx.open_sessions(device_id=device.name)]
            ended = end_sessions_audited(
                tx, open_ids, now, now_ms(self._clock), "ownership reset", device.spiffe_id
            )
            self._recorder.append(
                tx,
                AuditEvent(
                    device.spiffe_id,
                    "device.ownership_reset",
                    device.name,
                    {
                        "grants_dropped": [f"{g.role.value}:{g.user_id}" for g in dropped],
                        "sessions_ended": ended,
                    },
                ),
            )
            effects = Effects(
                end_sessions=(EndSessions("ownership reset", tuple(ended), device_id=device.name),)
            )
            # Every other replica ends the device's sessions too (same transaction as the change).
            tx.append_event(
                EFFECTS, effects_to_payload(effects), self._config.replica_name, now_ms(self._clock)
            )
            return OwnershipReset(code, tuple(ended), effects)

        return self._store.run(unit)

    # -- shares ----------------------------------------------------------------------------------
    def _require_owner(self, tx: Transaction, caller: Identity, device_id: str) -> None:
        grant = tx.get_grant(device_id, caller.name)
        if grant is None or grant.role is not Role.OWNER:
            raise PermissionDenied("only the device's owner can do this")

    def share(self, caller: Identity, device_id: str, username: str, expires_at: int) -> str:
        """Grant VIEWER access to username (optionally until expires_at); returns their user_id."""
        from broker.accounts.users import normalize_username

        validate_device_id(device_id)
        name = normalize_username(username)
        now = now_s(self._clock)
        if expires_at and expires_at <= now:
            raise InvalidArgument("expires_at must be in the future (or 0 for no expiry)")

        def unit(tx: Transaction) -> str:
            self._require_owner(tx, caller, device_id)
            user = tx.get_user_by_username(name)
            if user is None:
                raise NotFound("no user with that username")
            if user.user_id == caller.name:
                raise InvalidArgument("you already own this device")
            tx.delete_grant(device_id, user.user_id)  # re-sharing replaces the expiry
            tx.insert_grant(
                GrantRecord(
                    device_id, user.user_id, Role.VIEWER, caller.spiffe_id, now, expires_at or None
                )
            )
            self._recorder.append(
                tx,
                AuditEvent(
                    caller.spiffe_id,
                    "share.granted",
                    device_id,
                    {"user_id": user.user_id, "expires_at": expires_at},
                ),
            )
            return user.user_id

        return self._store.run(unit)

    def revoke_share(self, caller: Identity, device_id: str, username: str) -> ShareRevoked:
        """Withdraw a VIEWER grant; that viewer's sessions on the device end."""
        from broker.accounts.users import normalize_username

        validate_device_id(device_id)
        name = normalize_username(username)

        def unit(tx: Transaction) -> ShareRevoked:
            self._require_owner(tx, caller, device_id)
            user = tx.get_user_by_username(name)
            grant = tx.get_grant(device_id, user.user_id) if user else None
            if user is None or grant is None or grant.role is not Role.VIEWER:
                raise NotFound("that user has no share on this device")
            tx.delete_grant(device_id, user.user_id)
            open_ids = [
                s.session_id for s in tx.open_sessions(device_id=device_id, user_id=user.user_id)
            ]
            ended = end_sessions_audited(
                tx,
                open_ids,
                now_s(self._clock),
                now_ms(self._clock),
                "share revoked",
                caller.spiffe_id,
            )
            self._recorder.append(
                tx,
                AuditEvent(
                    caller.spiffe_id,
                    "share.revoked",
                    device_id,
                    {"user_id": user.user_id, "sessions_ended": ended},
                ),
            )
            effects = Effects(
                end_sessions=(
                    EndSessions(
                        "share revoked", tuple(ended), device_id=device_id, user_id=user.user_id
                    ),
                )
            )
            # Every other replica ends that viewer's sessions too (same transaction as the change).
            tx.append_event(
                EFFECTS, effects_to_payload(effects), self._config.replica_name, now_ms(self._clock)
            )
            return ShareRevoked(tuple(ended), effects)

        return self._store.run(unit)

    # -- queries ---------------------------------------------------------------------------------
    def devices_of(self, caller: Identity) -> list[DeviceAccess]:
        """Devices the caller's user owns or holds an unexpired share on."""
        now = now_s(self._clock)
        with self._store.read() as tx:
            result = []
            for grant in tx.grants_of_user(caller.name):
                device = tx.get_device(grant.device_id)
                if (
                    device is not None
                    and device.state is DeviceState.ACTIVE
                    and grant.active_at(now)
                ):
                    attachment = tx.get_attachment(device.device_id)
                    online = attachment is not None and attachment.live_at(now)
                    result.append(DeviceAccess(grant, device, online))
            return result


def require_grant(tx: Transaction, user_id: str, device_id: str, now: int) -> GrantRecord:
    """The user's live grant on an active device, read from the store of record (I4)."""
    device = tx.get_device(device_id)
    if device is None or device.state is not DeviceState.ACTIVE:
        raise PermissionDenied("no access to that device")
    grant = tx.get_grant(device_id, user_id)
    if grant is None:
        raise PermissionDenied("no access to that device")
    if not grant.active_at(now):
        raise PermissionDenied("your share on that device has expired")
    return grant


def require_app(identity: Identity) -> None:
    """Only app identities act as users."""
    if identity.kind is not Kind.APP:
        raise PermissionDenied("this needs an app-instance certificate")
