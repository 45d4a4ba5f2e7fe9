"""Explicit broker configuration, passed to everything that needs it (no module singletons)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from broker.identity.spiffe import validate_trust_domain
from broker.protocol.spiffe_id import SpiffeId

DAY = 86_400
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"  # Prometheus' registered port for this kind of use


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the broker reads at start-up. Paths are relative to ``home`` unless absolute."""

    home: Path = field(default_factory=Path.cwd)
    trust_domain: str = "camera.local"
    bootstrap_address: str = "127.0.0.1:8444"
    main_address: str = "127.0.0.1:8443"
    # grpcio cannot make a client certificate optional (it either never asks or requires one), so
    # birth-certificate enrollment has its own mutual-TLS listener bound to the factory CA.
    factory_address: str = "127.0.0.1:8445"
    # Fleet (issue 11). Each replica has a unique name; its internal listener (replica-to-replica
    # mutual TLS, replica certificates only) is where other replicas forward Watch calls.
    replica_name: str = "r1"
    internal_address: str = "127.0.0.1:0"
    # Several processes may share the public ports on one host (SO_REUSEPORT).
    so_reuseport: bool = False
    # An attachment (device -> replica, epoch) is live while its lease runs; heartbeats renew it.
    attach_lease_seconds: int = 45
    # A replica whose event feed has not been read for this long refuses OpenSession and Watch.
    event_feed_stale_seconds: float = 5.0
    # SIGTERM: cameras are told to reconnect elsewhere at times spread over this window.
    drain_window_seconds: float = 30.0
    watch_wait_seconds: float = 10.0  # a Watch waits this long for a re-attaching camera
    # Prometheus /metrics (plain HTTP, no auth: keep it on loopback or a private network).
    # "" switches it off; port 0 picks a free port (logged, and in BrokerServer.ports).
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    core_queue_limit: int = 1000  # new device/app calls are shed beyond this backlog (0: never)
    # Concurrent connections one client address (IPv6: one /64) may hold on each public
    # listener; more are closed on accept. 0: no gate (e.g. behind a load balancer that hides
    # client addresses and enforces its own limit).
    max_connections_per_address: int = 256
    # A connection that has not finished its TLS handshake by then is closed; one with no RPC
    # in flight for idle_connection_seconds gets GOAWAY (clients reconnect on their next call).
    handshake_timeout_seconds: float = 10.0
    idle_connection_seconds: float = 10.0
    server_names: tuple[str, ...] = ("localhost",)
    device_cert_days: int = 30
    operator_cert_days: int = 90
    server_cert_days: int = 90
    enrollment_token_ttl_seconds: int = 7 * DAY
    max_enrollment_token_ttl_seconds: int = 30 * DAY
    # A renewed certificate stays usable this long, so in-flight reconnects do not fail.
    superseded_grace_seconds: int = 3_600
    heartbeat_interval_seconds: int = 15
    attach_hello_timeout_seconds: float = 10.0
    max_message_bytes: int = 64 * 1024
    db_path: Path | None = None
    # BROKER_STORE: sqlite:///<path> or postgresql://...; empty means SQLite at `database`.
    store_url: str = ""
    # SQLite only: FULL (the default) makes every acknowledged commit survive a power loss;
    # NORMAL/OFF exist for benchmarks that measure what durability costs, never for production.
    sqlite_synchronous: str = "FULL"
    allow_signup: bool = True
    app_cert_days: int = 7
    # Session tokens must be used to start a stream within this time (DESIGN: at most 5 min).
    session_token_ttl_seconds: int = 300
    # argon2id cost (argon2-cffi's RFC 9106 low-memory profile by default: t=3, 64 MiB, p=4).
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65_536
    argon2_parallelism: int = 4
    # Login limits (README "Login limits"). Hard budgets per (address, username) pair and per
    # username (the latter not where the user logged in before: a trusted pair); per address
    # only a slowdown: past its budget, untrusted attempts take store-reserved slots.
    login_failures_per_pair: int = 5  # per login_window_seconds
    login_failures_per_user: int = 20  # across addresses, per login_user_window_seconds
    login_failures_per_peer: int = 20  # per login_window_seconds, before the slowdown starts
    login_window_seconds: int = 300
    login_user_window_seconds: int = 900
    login_slow_delay_seconds: float = 0.5  # slot spacing, doubled per further budget's worth
    login_slow_max_delay_seconds: float = 4.0
    login_slow_max_wait_seconds: float = 10.0  # a slot further away is RESOURCE_EXHAUSTED
    login_flight_seconds: float = 60.0  # an admitted attempt counts in flight at most this long
    login_trust_days: int = 30  # a successful (address, username) stays trusted this long
    login_audit_window_seconds: int = 60  # refused attempts are summarized per this window
    # Wrong claim codes allowed per window, per user and per device (I8).
    claim_failures_per_user: int = 5
    claim_failures_per_device: int = 10
    claim_window_seconds: int = 600
    # Renewal after expiry (Bootstrap.RenewExpiredCertificate): a certificate that expired at most
    # this many days ago (and was not revoked or superseded) is renewed on proof of its key; past
    # it, a camera needs a new enrollment token and an app must log in again. 0 switches it off.
    device_expired_renewal_days: int = 180
    app_expired_renewal_days: int = 30
    # Log lines: "text" (the default) or "json" (one object per line with request_id; broker.logs).
    log_format: str = "text"

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        if not 10 <= self.session_token_ttl_seconds <= 300:
            raise ValueError("session_token_ttl_seconds must be between 10 and 300")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")

    @property
    def broker_spiffe_id(self) -> str:
        """The issuer (iss) of every session token."""
        return str(SpiffeId.broker(self.trust_domain))

    @property
    def certs_dir(self) -> Path:
        return self.home / "certs"

    @property
    def database(self) -> Path:
        if self.db_path is None:
            return self.home / "var" / "broker.db"
        return self.db_path if self.db_path.is_absolute() else self.home / self.db_path

    def with_overrides(self, **changes: object) -> Config:
        """A copy with the given fields changed (unknown names raise TypeError)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def from_environment(home: Path | None = None) -> Config:
    """Build a Config from BROKER_* environment variables over the defaults."""
    env = os.environ
    cfg = Config(home=(home or Path(env.get("BROKER_HOME", Path.cwd()))).resolve())
    overrides: dict[str, object] = {}
    string_fields = {
        "BROKER_TRUST_DOMAIN": "trust_domain",
        "BROKER_BOOTSTRAP_ADDRESS": "bootstrap_address",
        "BROKER_MAIN_ADDRESS": "main_address",
        "BROKER_FACTORY_ADDRESS": "factory_address",
        "BROKER_METRICS_ADDRESS": "metrics_address",
        "BROKER_LOG_FORMAT": "log_format",
    }
    for var, name in string_fields.items():
        if var in env:
            overrides[name] = env[var]
    if "BROKER_ALLOW_SIGNUP" in env:
        overrides["allow_signup"] = env["BROKER_ALLOW_SIGNUP"].lower() not in ("0", "false", "no")
    if "BROKER_STORE" in env:
        overrides["store_url"] = env["BROKER_STORE"]
    if "BROKER_REPLICA" in env:
        overrides["replica_name"] = env["BROKER_REPLICA"]
    if "BROKER_INTERNAL_ADDRESS" in env:
        overrides["internal_address"] = env["BROKER_INTERNAL_ADDRESS"]
    if "BROKER_DB" in env:
        overrides["db_path"] = Path(env["BROKER_DB"])
    if "BROKER_SERVER_NAMES" in env:
        names = tuple(n.strip() for n in env["BROKER_SERVER_NAMES"].split(",") if n.strip())
        overrides["server_names"] = names
    for var, (name, parse) in NUMBER_FIELDS.items():
        if var in env:
            overrides[name] = _number(var, env[var], parse)
    return cfg.with_overrides(**overrides) if overrides else cfg


# Load knobs an operator may set without code: variable -> (field, type).
NUMBER_FIELDS: dict[str, tuple[str, type[int] | type[float]]] = {
    "BROKER_WATCH_WAIT_SECONDS": ("watch_wait_seconds", float),
    "BROKER_CORE_QUEUE_LIMIT": ("core_queue_limit", int),
    "BROKER_MAX_CONNECTIONS_PER_ADDRESS": ("max_connections_per_address", int),
    "BROKER_HANDSHAKE_TIMEOUT_SECONDS": ("handshake_timeout_seconds", float),
    "BROKER_IDLE_CONNECTION_SECONDS": ("idle_connection_seconds", float),
    "BROKER_DRAIN_WINDOW_SECONDS": ("drain_window_seconds", float),
    "BROKER_DEVICE_EXPIRED_RENEWAL_DAYS": ("device_expired_renewal_days", int),
    "BROKER_APP_EXPIRED_RENEWAL_DAYS": ("app_expired_renewal_days", int),
    "BROKER_LOGIN_FAILURES_PER_PAIR": ("login_failures_per_pair", int),
    "BROKER_LOGIN_FAILURES_PER_USER": ("login_failures_per_user", int),
    "BROKER_LOGIN_FAILURES_PER_PEER": ("login_failures_per_peer", int),
    "BROKER_LOGIN_WINDOW_SECONDS": ("login_window_seconds", int),
    "BROKER_LOGIN_USER_WINDOW_SECONDS": ("login_user_window_seconds", int),
    "BROKER_LOGIN_SLOW_DELAY_SECONDS": ("login_slow_delay_seconds", float),
    "BROKER_LOGIN_SLOW_MAX_DELAY_SECONDS": ("login_slow_max_delay_seconds", float),
    "BROKER_LOGIN_SLOW_MAX_WAIT_SECONDS": ("login_slow_max_wait_seconds", float),
    "BROKER_LOGIN_TRUST_DAYS": ("login_trust_days", int),
    "BROKER_LOGIN_AUDIT_WINDOW_SECONDS": ("login_audit_window_seconds", int),
}


def _number(var: str, raw: str, parse: type[int] | type[float]) -> int | float:
    try:
        value = parse(raw)
    except ValueError:
        kind = "an integer" if parse is int else "a number"
        raise ValueError(f"{var}={raw!r}: expected {kind}") from None
    if value < 0:
        raise ValueError(f"{var}={raw!r} must not be negative")
    return value
