"""Fleet audit: suspicious patterns over a time window, read from the store of record only.

Every input is shared state (audit log, failure counters, certificates, attachments, sessions),
read in one snapshot, so every replica gives the same answer. Categories:

- possible clones:    ``device.attach.replaced`` (a second live Attach of one device ended the first)
- key reuse:          enrollments and renewals refused because the key belongs to another identity
- revoked attempts:   calls refused because the certificate, device or app instance is revoked
                      (``broker.audit.attempts`` counts them per certificate)
- expiring offline:   active device certificates expiring soon on devices not attached anywhere
- relay alarms:       ``relay.alarm`` (e.g. a frame from a camera that is not the session's)
- session fan-out:    users who opened sessions on unusually many distinct devices within a window

Owns: AuditThresholds, Finding, FleetReport, fleet_audit. Never grpc.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.audit import attempts
from broker.audit.chain import AuditEntry
from broker.clock import Clock, now_ms
from broker.errors import InvalidArgument
from broker.store.base import DeviceState, SessionOutcome

if TYPE_CHECKING:
    from broker.store.base import SessionRecord, Store, Transaction

# SPIFFE ID -> (kind, id): ("device", device_id), ("app", app_id), else ("unknown", the text).
# Passed in by the caller, so that SPIFFE IDs stay parsed in one module (broker.identity).
Identify = Callable[[str], tuple[str, str]]

DAY = 86_400
MAX_SINCE_SECONDS = attempts.RETENTION_MS // 1000  # attempt counts are kept this long
MAX_EXPIRING_SECONDS = 365 * DAY
MAX_FANOUT_DEVICES = 100_000

CLONE_ACTION = "device.attach.replaced"
ALARM_ACTION = "relay.alarm"
KEY_REUSE_REASON = "key bound to another identity"
# Refusals that name a key held by another identity: (action, kind of identity the subject names).
KEY_REUSE_ACTIONS = {
    "device.enroll.denied": "device",  # subject: the device being enrolled
    "certificate.renew.denied": "",  # subject: device_id or app_id (kind from the actor)
    "app.enroll.denied": "user",  # subject: the user enrolling a new app instance
}


@dataclass(frozen=True, slots=True)
class AuditThresholds:
    """What a fleet audit looks at; zeros in a request mean these defaults."""

    since_seconds: int = 7 * DAY
    expiring_within_seconds: int = 7 * DAY
    fanout_min_devices: int = 20
    fanout_window_seconds: int = DAY

    @classmethod
    def from_request(
        cls,
        since_seconds: int = 0,
        expiring_within_seconds: int = 0,
        fanout_min_devices: int = 0,
        fanout_window_seconds: int = 0,
    ) -> AuditThresholds:
        """Thresholds from request fields (0 = default); raises InvalidArgument when out of
        range. The fan-out window is capped at the audit window."""
        default = cls()
        since = since_seconds or default.since_seconds
        if not 60 <= since <= MAX_SINCE_SECONDS:
            raise InvalidArgument(f"since_seconds must be between 60 and {MAX_SINCE_SECONDS}")
        expiring = expiring_within_seconds or default.expiring_within_seconds
        if not 60 <= expiring <= MAX_EXPIRING_SECONDS:
            raise InvalidArgument(
                f"expiring_within_seconds must be between 60 and {MAX_EXPIRING_SECONDS}"
            )
        devices = fanout_min_devices or default.fanout_min_devices
        if not 2 <= devices <= MAX_FANOUT_DEVICES:
            raise InvalidArgument(f"fanout_min_devices must be between 2 and {MAX_FANOUT_DEVICES}")
        window = fanout_window_seconds or default.fanout_window_seconds
        if window < 60:
            raise InvalidArgument("fanout_window_seconds must be at least 60")
        return cls(since, expiring, devices, min(window, since))


@dataclass(frozen=True, slots=True)
class Finding:
    """One suspicious pattern of one identity. ``kind`` is device, app, user or unknown; the
    meaning of count, detail and value depends on the category (see FleetReport)."""

    kind: str
    id: str
    count: int
    first_seen_ms: int
    last_seen_ms: int
    detail: str = ""
    value: int = 0


@dataclass(frozen=True, slots=True)
class FleetReport:
    """Findings per category, each sorted by (kind, id, detail).

    - possible_clones: count = Attach streams replaced; detail = replicas involved
    - key_reuse: count = refusals; detail = which requests (enroll, renew)
    - revoked_attempts: one per certificate; count = refused calls (at most 1,000 counted per
      hour); detail = the certificate serial
    - expiring_offline: count = 1; detail = serial; value = not_after (unix s); first/last seen =
      the device's last attach (0 if never)
    - relay_alarms: count = alarms; detail = their reasons
    - session_fanout: count = distinct devices in the busiest window; value = sessions opened in
      it (denied included); detail = how many were denied; first/last seen = that window's
    """

    generated_at_ms: int
    since_ms: int
    thresholds: AuditThresholds
    possible_clones: tuple[Finding, ...] = ()
    key_reuse: tuple[Finding, ...] = ()
    revoked_attempts: tuple[Finding, ...] = ()
    expiring_offline: tuple[Finding, ...] = ()
    relay_alarms: tuple[Finding, ...] = ()
    session_fanout: tuple[Finding, ...] = field(default=())

    def total(self) -> int:
        """How many findings in every category together."""
        return sum(len(getattr(self, name)) for name, _ in CATEGORIES)


# (FleetReport field, heading) in report order.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("possible_clones", "possible clones (two live Attach streams of one device)"),
    ("key_reuse", "key reuse (another identity's key presented)"),
    ("revoked_attempts", "revoked identities still connecting"),
    ("expiring_offline", "certificates expiring soon on offline devices"),
    ("relay_alarms", "relay alarms"),
    ("session_fanout", "viewers opening sessions on unusually many cameras"),
)


def fleet_audit(
    store: Store, clock: Clock, thresholds: AuditThresholds, identify: Identify
) -> FleetReport:
    """Read the fleet's shared state in one snapshot and report every category."""
    generated = now_ms(clock)
    since_ms = generated - thresholds.since_seconds * 1000
    now_s = generated // 1000
    with store.read() as tx:
        entries = tx.audit_entries_since(since_ms, (CLONE_ACTION, ALARM_ACTION, *KEY_REUSE_ACTIONS))
        by_action: dict[str, list[AuditEntry]] = defaultdict(list)
        for entry in entries:
            by_action[entry.action].append(entry)
        return FleetReport(
            generated,
            since_ms,
            thresholds,
            possible_clones=_clones(by_action[CLONE_ACTION]),
            key_reuse=_key_reuse(by_action, identify),
            revoked_attempts=_revoked_attempts(tx, since_ms, identify),
            expiring_offline=_expiring_offline(
                tx, now_s, thresholds.expiring_within_seconds, identify
            ),
            relay_alarms=_alarms(by_action[ALARM_ACTION]),
            session_fanout=_fanout(
                tx.fanout_sessions(since_ms // 1000, thresholds.fanout_min_devices),
                thresholds.fanout_min_devices,
                thresholds.fanout_window_seconds,
            ),
        )


def _grouped(
    entries: Iterable[AuditEntry],
    key: Callable[[AuditEntry], tuple[str, str] | None],
    detail: Callable[[AuditEntry], str],
) -> tuple[Finding, ...]:
    """One finding per (kind, id) key: count, first and last time, sorted distinct details."""
    groups: dict[tuple[str, str], list[AuditEntry]] = defaultdict(list)
    for entry in entries:
        k = key(entry)
        if k is not None:
            groups[k].append(entry)
    findings = [
        Finding(
            kind,
            ident,
            len(group),
            min(e.at_ms for e in group),
            max(e.at_ms for e in group),
            ", ".join(sorted({d for d in (detail(e) for e in group) if d})),
        )
        for (kind, ident), group in groups.items()
    ]
    return tuple(sorted(findings, key=lambda f: (f.kind, f.id, f.detail)))


def _clones(entries: list[AuditEntry]) -> tuple[Finding, ...]:
    def replicas(entry: AuditEntry) -> str:
        names = {
            str(entry.detail.get("previous_replica", "")),
            str(entry.detail.get("replica", "")),
        }
        return ", ".join(sorted(n for n in names if n))

    return _grouped(entries, lambda e: ("device", e.subject), replicas)


def _alarms(entries: list[AuditEntry]) -> tuple[Finding, ...]:
    return _grouped(entries, lambda e: ("device", e.subject), lambda e: str(e.detail.get("reason")))


def _key_reuse(by_action: dict[str, list[AuditEntry]], identify: Identify) -> tuple[Finding, ...]:
    def key(entry: AuditEntry) -> tuple[str, str] | None:
        if entry.detail.get("reason") != KEY_REUSE_REASON or not entry.subject:
            return None
        kind = KEY_REUSE_ACTIONS[entry.action] or identify(entry.actor)[0]
        return kind, entry.subject

    def request(entry: AuditEntry) -> str:
        return "renew" if entry.action == "certificate.renew.denied" else "enroll"

    entries = [e for action in KEY_REUSE_ACTIONS for e in by_action.get(action, [])]
    return _grouped(entries, key, request)


def _revoked_attempts(tx: Transaction, since_ms: int, identify: Identify) -> tuple[Finding, ...]:
    findings = []
    for counted in tx.failure_counts(attempts.SCOPE, since_ms):
        record = tx.get_certificate(counted.key)
        kind, ident = identify(record.spiffe_id) if record else ("unknown", "")
        findings.append(
            Finding(kind, ident, counted.count, counted.first_ms, counted.last_ms, counted.key)
        )
    return tuple(sorted(findings, key=lambda f: (f.kind, f.id, f.detail)))


def _expiring_offline(
    tx: Transaction, now: int, within: int, identify: Identify
) -> tuple[Finding, ...]:
    findings = []
    for cert in tx.device_certificates_expiring(now, now + within):
        kind, device_id = identify(cert.spiffe_id)
        record = tx.get_device(device_id) if kind == "device" else None
        if record is None or record.state is not DeviceState.ACTIVE:
            continue
        attachment = tx.get_attachment(device_id)
        if attachment is not None and attachment.live_at(now):
            continue  # online: it renews at 2/3 of the lifetime on its own
        seen = (record.last_seen_at or 0) * 1000
        findings.append(Finding("device", device_id, 1, seen, seen, cert.serial, cert.not_after))
    return tuple(sorted(findings, key=lambda f: (f.kind, f.id, f.detail)))


def _fanout(sessions: list[SessionRecord], min_devices: int, window: int) -> tuple[Finding, ...]:
    by_user: dict[str, list[SessionRecord]] = defaultdict(list)
    for session in sessions:  # the store returns them by user, then opened_at
        by_user[session.user_id].append(session)
    findings = []
    for user_id, opened in by_user.items():
        busiest = _busiest_window(opened, window)
        if busiest is None:
            continue
        start, end = busiest
        inside = opened[start : end + 1]
        devices = len({s.device_id for s in inside})
        if devices < min_devices:
            continue
        denied = sum(1 for s in inside if s.outcome is SessionOutcome.DENIED)
        findings.append(
            Finding(
                "user",
                user_id,
                devices,
                inside[0].opened_at * 1000,
                inside[-1].opened_at * 1000,
                f"{denied} denied",
                len(inside),
            )
        )
    return tuple(sorted(findings, key=lambda f: (f.kind, f.id, f.detail)))


def _busiest_window(opened: list[SessionRecord], window: int) -> tuple[int, int] | None:
    """(first, last) index of the span shorter than window seconds with the most distinct
    devices (sliding window over sessions sorted by opened_at)."""
    best: tuple[int, int] | None = None
    best_devices = 0
    devices: Counter[str] = Counter()
    start = 0
    for end, session in enumerate(opened):
        devices[session.device_id] += 1
        while session.opened_at - opened[start].opened_at >= window:
            gone = opened[start].device_id
            devices[gone] -= 1
            if not devices[gone]:
                del devices[gone]
            start += 1
        if len(devices) > best_devices:
            best, best_devices = (start, end), len(devices)
    return best
