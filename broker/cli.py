"""The ``broker`` command: serve, PKI, device tokens, revocation, audit verification."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from broker.client.admin import AdminClient, OperatorCredentials
from broker.clock import SystemClock
from broker.config import Config, from_environment
from broker.errors import BrokerError
from broker.pki.ca import PkiFiles, init_pki
from broker.pki.rotation import RotationReport
from broker.store import Store

log = logging.getLogger("broker")


def _config(args: argparse.Namespace) -> Config:
    config = from_environment(Path(args.home) if args.home else None)
    store = getattr(args, "store", None)
    return dataclasses.replace(config, store_url=store) if store else config


def _open_store(config: Config, *, migrate: bool = True) -> Store:
    from broker.store.open import open_store

    return open_store(config, migrate=migrate)


def _raise_open_file_limit() -> None:
    """Every attached camera holds a socket: raise the soft descriptor limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _serve_config(args: argparse.Namespace) -> Config:
    config = _config(args)
    changes: dict[str, object] = {}
    if args.replica:
        changes["replica_name"] = args.replica
    if args.internal:
        changes["internal_address"] = args.internal
    if args.so_reuseport:
        changes["so_reuseport"] = True
    if args.drain_window is not None:
        changes["drain_window_seconds"] = args.drain_window
    if args.metrics_address is not None:
        changes["metrics_address"] = args.metrics_address
    if args.log_format:
        changes["log_format"] = args.log_format
    return config.with_overrides(**changes) if changes else config


def cmd_serve(args: argparse.Namespace) -> int:
    config = _serve_config(args)
    _raise_open_file_limit()
    if args.init_pki:
        _init(config)
    if args.workers > 1:
        return _serve_workers(args, config)
    return _serve_one(config)


def _serve_one(config: Config) -> int:
    """One replica in this process. SIGTERM drains (health NOT_SERVING, cameras moved to other
    replicas over the drain window, sessions ended "broker draining"), SIGINT stops at once."""
    from broker.service.server import BrokerServer
    from broker.store.open import store_url

    replica = config.replica_name

    async def run() -> None:
        server = BrokerServer(config)
        ports = await server.start()
        internal = f", internal :{ports['internal']}" if "internal" in ports else ""
        print(
            f"broker serving: bootstrap "
            f"{config.bootstrap_address.rsplit(':', 1)[0]}:{ports['bootstrap']}, "
            f"main :{ports['main']}, factory :{ports['factory']}{internal} (replica {replica}; "
            f"trust domain {config.trust_domain}; store {_redacted(store_url(config))})",
            flush=True,
        )
        received: asyncio.Queue[signal.Signals] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, received.put_nowait, sig)
        first = await received.get()
        for sig in (signal.SIGINT, signal.SIGTERM):  # later signals: already on the way out
            loop.add_signal_handler(sig, lambda: None)
        if first is signal.SIGTERM:
            print(
                f"broker draining (replica {replica}, window {config.drain_window_seconds:g} s)",
                flush=True,
            )
            await server.drain()
        else:
            print(f"broker stopping (replica {replica})", flush=True)
            await server.stop(2.0)
        print(f"broker stopped (replica {replica})", flush=True)

    asyncio.run(run())
    return 0


def _worker_names(args: argparse.Namespace) -> list[str]:
    """<base>-1..N for an explicit --replica/BROKER_REPLICA base, else r1..rN."""
    base = args.replica or os.environ.get("BROKER_REPLICA", "")
    if base:
        return [f"{base}-{i}" for i in range(1, args.workers + 1)]
    return [f"r{i}" for i in range(1, args.workers + 1)]


def _worker_command(args: argparse.Namespace, config: Config, name: str) -> list[str]:
    internal_host = config.internal_address.rsplit(":", 1)[0] or "127.0.0.1"
    command = [sys.executable, "-m", "broker.cli", "--home", str(config.home), "serve"]
    command += ["--replica", name, "--internal", f"{internal_host}:0", "--so-reuseport"]
    if args.drain_window is not None:
        command += ["--drain-window", str(args.drain_window)]
    if args.log_format:
        command += ["--log-format", args.log_format]
    # Replica i (1-based) serves metrics on the configured port + i - 1 (port 0 stays 0), so
    # a static scrape config lists 9464, 9465, ... ("" keeps metrics off in every replica).
    from broker.service.metrics import offset_port

    index = _worker_names(args).index(name)
    command += ["--metrics-address", offset_port(config.metrics_address, index)]
    return command


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _serve_workers(args: argparse.Namespace, config: Config) -> int:
    """N replicas as child processes sharing the public ports (SO_REUSEPORT). SIGTERM/SIGINT are
    forwarded to every child; a child that dies on its own is started again (unless it dies
    within seconds of starting, which stops them all); the exit status is the worst child's."""
    import subprocess
    import time

    from broker.store.open import store_url

    if store_url(config).startswith("sqlite"):
        print(
            "error: --workers > 1 needs a PostgreSQL store (--store postgresql://...): replicas "
            "share attachments, events and rate limits through it",
            file=sys.stderr,
        )
        return 2
    store = _open_store(config)  # migrate once, before the replicas race to
    store.close()
    names = _worker_names(args)
    children: dict[str, subprocess.Popen[bytes]] = {}
    started: dict[str, float] = {}
    stopping: list[signal.Signals] = []

    def spawn(name: str) -> None:
        # The store URL goes by environment, not argv: it may carry a password (I11).
        env = {**os.environ, "BROKER_STORE": config.store_url} if config.store_url else None
        children[name] = subprocess.Popen(
            _worker_command(args, config, name), env=env, start_new_session=True
        )
        started[name] = time.monotonic()

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signal.Signals(signum))
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    worst = 0
    try:
        for name in names:
            spawn(name)
        print(f"broker: {len(names)} replica(s) {', '.join(names)} (pid {os.getpid()})", flush=True)
        while any(child.poll() is None for child in children.values()):
            time.sleep(0.2)
            if stopping:
                continue
            for name, child in list(children.items()):
                code = child.poll()
                if code is None:
                    continue
                status = _exit_status(code)
                if time.monotonic() - started[name] < 10:
                    print(f"broker: replica {name} exited ({status}) at start; stopping all")
                    worst = max(worst, status or 1)
                    forward(signal.SIGTERM, None)
                    break
                print(f"broker: replica {name} exited ({status}); starting it again", flush=True)
                spawn(name)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children.values():
            if child.poll() is None:
                child.terminate()
    for child in children.values():
        worst = max(worst, _exit_status(child.wait()))
    return worst


def _register_offline(config: Config, actor: str) -> None:
    """Tell the store about operator/broker certificates made offline (else they are refused)."""
    from broker.devices.enrollment import DeviceAuthority
    from broker.pki.ca import load_authority

    store = _open_store(config)
    try:
        clock = SystemClock()
        devices = DeviceAuthority(config, load_authority(config, clock), store, clock)
        devices.register_offline_certificates(PkiFiles(config.certs_dir), actor)
    finally:
        store.close()


def _init(config: Config) -> int:
    report = init_pki(config, SystemClock())
    _register_offline(config, "broker ca init")
    if report.created:
        for path in report.created:
            print(f"created {path}")
        print(
            f"dev PKI ready in {config.certs_dir}; devices pin {PkiFiles(config.certs_dir).ca_bundle}"
        )
    else:
        print(f"dev PKI already present in {config.certs_dir}; nothing replaced")
    return 0


def cmd_ca_init(args: argparse.Namespace) -> int:
    return _init(_config(args))


def _admin(args: argparse.Namespace) -> AdminClient:
    config = _config(args)
    target = args.broker or config.main_address
    return AdminClient(target, OperatorCredentials.from_certs_dir(config.certs_dir))


def cmd_device_token(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        response = admin.create_enrollment_token(args.device_id, args.ttl)
    print(
        f"enrollment token for {response.device_id} (expires at unix {response.expires_at}); shown once:"
    )
    print(response.enrollment_token)
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        devices = admin.list_devices()
    print(f"{'DEVICE':<24} {'STATE':<8} {'ONLINE':<6} {'CERT EXPIRES':<12} SERIAL")
    for d in devices:
        print(
            f"{d.device_id:<24} {d.state:<8} {'yes' if d.online else 'no':<6} {d.certificate_not_after:<12} {d.certificate_serial}"
        )
    print(f"{len(devices)} device(s)")
    return 0


def cmd_revoke_device(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        response = admin.revoke_device(args.device_id, args.reason)
    print(
        f"revoked device {response.device_id}: {len(response.revoked_serials)} certificate(s) "
        f"{', '.join(response.revoked_serials)}; {response.attach_streams_closed} live stream(s) closed"
    )
    print(
        "next: the device can no longer connect; enroll replacement hardware under a new device_id"
    )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from broker.audit.chain import verify_chain
    from broker.store.open import store_url

    config = _config(args)
    if not config.store_url and not config.database.exists():
        print(f"no database at {config.database}", file=sys.stderr)
        return 2
    store = _open_store(config, migrate=False)
    print(f"store: {_redacted(store_url(config))}")
    try:
        result = verify_chain(store.audit_entries())
    finally:
        store.close()
    if result.ok:
        print(f"audit log OK: {result.entries} entries, head {result.head_hash}")
        return 0
    print(f"audit log BROKEN at seq {result.first_bad_seq}: {result.reason}", file=sys.stderr)
    return 1


def _audit_local(config: Config, action: str, detail: dict[str, object]) -> None:
    """Offline rotations are audited in the same hash chain as everything else (I12)."""
    import getpass

    from broker.audit.chain import AuditEvent

    store = _open_store(config)
    try:
        event = AuditEvent(f"cli:{getpass.getuser()}", action, "pki", detail)
        at_ms = int(SystemClock().now().timestamp() * 1000)
        store.run(lambda tx: tx.append_audit(event, at_ms))
    finally:
        store.close()


def _reload_broker(admin: AdminClient) -> None:
    """Ask a running broker to pick up certs/ changes; say so if none is running."""
    try:
        with admin:
            response = admin.reload_pki()
    except grpc.RpcError as error:
        if error.code() is grpc.StatusCode.UNAVAILABLE:
            print("broker not reachable: it will use the new material when it next starts")
            return
        raise
    print(
        f"broker reloaded: trust bundle {response.trust_bundle_version} "
        f"({'changed' if response.bundle_changed else 'unchanged'}), "
        f"pushed to {response.cameras_notified} attached camera(s); "
        f"issuing CA serial {response.issuing_ca_serial}"
    )


def _rotation(args: argparse.Namespace, run: Callable[[Config], RotationReport]) -> int:
    config = _config(args)
    # Credentials are read before the rotation: the broker trusts the current operator
    # certificate until it reloads, and may not yet trust one the rotation issues.
    admin = _admin(args)
    report = run(config)
    _register_offline(config, f"broker ca {args.ca_command}")
    _audit_local(config, report.action, report.details)
    print(f"{report.action}:")
    for key, value in report.details.items():
        print(f"  {key}: {value}")
    _reload_broker(admin)
    print(f"next: {report.next_step}")
    return 0


def cmd_rotate_server_cert(args: argparse.Namespace) -> int:
    from broker.pki.rotation import rotate_server_cert

    return _rotation(args, lambda c: rotate_server_cert(c, SystemClock()))


def cmd_rotate_intermediate(args: argparse.Namespace) -> int:
    from broker.pki.rotation import rotate_intermediate

    return _rotation(args, lambda c: rotate_intermediate(c, SystemClock()))


def cmd_rotate_root(args: argparse.Namespace) -> int:
    from broker.pki.rotation import rotate_root

    return _rotation(args, lambda c: rotate_root(c, SystemClock()))


def cmd_rotate_token_key(args: argparse.Namespace) -> int:
    from broker.pki.rotation import rotate_token_key

    return _rotation(args, lambda c: rotate_token_key(c, SystemClock()))


def cmd_retire_root(args: argparse.Namespace) -> int:
    from broker.pki.rotation import retire_root
    from broker.pki.trust import load_trust_bundle
    from broker.protocol.tokens import load_keyring

    def run(config: Config) -> RotationReport:
        version = load_trust_bundle(config, load_keyring(config.certs_dir).jwks_json()).version
        store = _open_store(config)
        try:
            return retire_root(config, store, version, force=args.force, clock=SystemClock())
        finally:
            store.close()

    return _rotation(args, run)


def cmd_crl(args: argparse.Namespace) -> int:
    from broker.pemfile import write_atomic
    from broker.pki.crl import build_crls, crls_pem

    config = _config(args)
    files = PkiFiles(config.certs_dir)
    store = _open_store(config)
    try:
        crls = build_crls(files, store, SystemClock())
    finally:
        store.close()
    path = files.root / "crl.pem"
    write_atomic(path, crls_pem(crls).encode("ascii"))
    entries = sum(len(list(c)) for c in crls)
    _audit_local(config, "pki.crl_published", {"crls": len(crls), "entries": entries})
    print(f"wrote {path}: {len(crls)} CRL(s), {entries} revoked certificate(s) not yet expired")
    print("next: publish it to relying parties; the broker also serves it (Bootstrap.GetCRL)")
    return 0


def cmd_rotation_status(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        s = admin.rotation_status()
    print(f"trust bundle version      {s.trust_bundle_version}")
    print(f"root rotation pending     {'yes' if s.root_rotation_pending else 'no'}")
    print(f"active cameras            {s.active_devices} ({s.online_devices} online)")
    print(
        f"holding current bundle    {s.devices_with_current_bundle} "
        f"({s.online_with_current_bundle} online)"
    )
    if s.lagging_device_ids:
        print(f"lagging                   {', '.join(s.lagging_device_ids)}")
    return 0


def cmd_fleet_audit(args: argparse.Namespace) -> int:
    from broker.service.fleet import report_from_pb, report_json, report_text

    with _admin(args) as admin:
        response = admin.fleet_audit(
            args.since,
            expiring_within_seconds=args.expiring_within,
            fanout_min_devices=args.fanout_devices,
            fanout_window_seconds=args.fanout_window,
        )
    report = report_from_pb(response)
    print(report_json(report) if args.json else report_text(report))
    return 0


def cmd_revoke_app(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        response = admin.revoke_app(args.app_id, args.reason)
    print(
        f"revoked app instance {response.app_id} of user {response.user_id}; "
        f"{response.sessions_ended} session(s) ended"
    )
    print("next: the app must log in again (EnrollApp) to get a new instance certificate")
    return 0


def cmd_factory_batch(args: argparse.Namespace) -> int:
    from broker.dev.factory import make_batch

    config = _config(args)
    batch = make_batch(PkiFiles(config.certs_dir), args.count, SystemClock(), args.prefix)
    for item in batch:
        print(f"{item.device_id} {item.cert_path} {item.key_path}")
    print(f"{len(batch)} birth certificate(s) in {PkiFiles(config.certs_dir).factory_batches}")
    return 0


def _redacted(url: str) -> str:
    """A store URL fit for a log line: any password replaced (I11)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from broker.store.open import store_url

    config = _config(args)
    store = _open_store(config, migrate=False)
    try:
        before = store.schema_version()
        store.migrate()
        after = store.schema_version()
    finally:
        store.close()
    target = _redacted(store_url(config))
    if before == after:
        print(f"{target}: schema v{after}, up to date")
    else:
        print(f"{target}: schema v{before} -> v{after}")
    return 0


def _add_serve_parser(sub: Any, store_help: str) -> None:
    serve = sub.add_parser("serve", help="run the broker in the foreground")
    serve.add_argument(
        "--init-pki", action="store_true", help="create the dev PKI first if missing"
    )
    serve.add_argument("--store", help=store_help)
    serve.add_argument(
        "--replica",
        help="this replica's name (default: $BROKER_REPLICA, else r1); with "
        "--workers N the children are <name>-1..N (r1..rN when not given)",
    )
    serve.add_argument(
        "--internal",
        help="internal (replica-to-replica) listener address "
        "(default: $BROKER_INTERNAL_ADDRESS, else 127.0.0.1:0)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run N replicas as child processes sharing the public ports (SO_REUSEPORT); "
        "needs a PostgreSQL store",
    )
    serve.add_argument(
        "--drain-window",
        type=float,
        help="SIGTERM: seconds over which cameras are moved to other replicas (default 30)",
    )
    serve.add_argument(
        "--metrics-address",
        help="Prometheus /metrics listener host:port, '' for none (default: "
        "$BROKER_METRICS_ADDRESS, else 127.0.0.1:9464); with --workers N replica i uses port+i-1",
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines as text or one JSON object per line with a request_id "
        "(default: $BROKER_LOG_FORMAT, else text)",
    )
    serve.add_argument("--so-reuseport", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)


def _add_fleet_audit_parser(sub: Any) -> None:
    fleet = sub.add_parser(
        "fleet-audit",
        help="suspicious patterns in the fleet (clones, key reuse, revoked callers, expiring "
        "offline certificates, relay alarms, session fan-out) via the running broker",
    )
    fleet.add_argument("--json", action="store_true", help="one JSON document")
    fleet.add_argument("--since", type=int, default=0, help="seconds back (default 7 days)")
    fleet.add_argument("--expiring-within", type=int, default=0, help="seconds (default 7 days)")
    fleet.add_argument(
        "--fanout-devices", type=int, default=0, help="distinct devices flagged (default 20)"
    )
    fleet.add_argument("--fanout-window", type=int, default=0, help="seconds (default 24 h)")
    fleet.add_argument("--broker", help="main listener address (default: config)")
    fleet.set_defaults(func=cmd_fleet_audit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__)
    parser.add_argument(
        "--home", help="directory holding certs/ and var/ (default: $BROKER_HOME or cwd)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    store_help = (
        "store URL: sqlite:///<path under home> or postgresql://... "
        "(default: $BROKER_STORE, else sqlite:///var/broker.db)"
    )
    _add_serve_parser(sub, store_help)

    db = sub.add_parser("db", help="store of record").add_subparsers(
        dest="db_command", required=True
    )
    migrate = db.add_parser("migrate", help="bring the store's schema up to date")
    migrate.add_argument("--store", help=store_help)
    migrate.set_defaults(func=cmd_db_migrate)

    ca = sub.add_parser("ca", help="PKI").add_subparsers(dest="ca_command", required=True)
    ca.add_parser("init", help="create the dev PKI (idempotent)").set_defaults(func=cmd_ca_init)
    for name, func, text in (
        ("rotate-server-cert", cmd_rotate_server_cert, "new broker certificate, no restart"),
        ("rotate-intermediate", cmd_rotate_intermediate, "new issuing CA under the same root"),
        ("rotate-root", cmd_rotate_root, "new root cross-signed by the old; bundle carries both"),
        ("rotate-token-key", cmd_rotate_token_key, "new session-token signing key"),
        ("crl", cmd_crl, "write certs/crl.pem"),
        ("rotation-status", cmd_rotation_status, "which cameras hold the current bundle"),
    ):
        sub_parser = ca.add_parser(name, help=text)
        sub_parser.add_argument("--broker", help="main listener address (default: config)")
        sub_parser.set_defaults(func=func)
    retire = ca.add_parser(
        "retire-root", help="drop the old root once every camera has the new bundle"
    )
    retire.add_argument("--force", action="store_true", help="retire even if cameras lag")
    retire.add_argument("--broker")
    retire.set_defaults(func=cmd_retire_root)

    device = sub.add_parser("device", help="devices").add_subparsers(
        dest="device_command", required=True
    )
    token = device.add_parser("token", help="one-time enrollment token for a device id")
    token.add_argument("device_id")
    token.add_argument("--ttl", type=int, default=0, help="seconds (default: 7 days)")
    token.add_argument("--broker", help="main listener address (default: config)")
    token.set_defaults(func=cmd_device_token)
    listing = device.add_parser("list", help="devices known to the broker")
    listing.add_argument("--broker")
    listing.set_defaults(func=cmd_device_list)

    admin = sub.add_parser("admin", help="operator actions").add_subparsers(
        dest="admin_command", required=True
    )
    revoke = admin.add_parser("revoke-device", help="revoke a device and end its streams")
    revoke.add_argument("device_id")
    revoke.add_argument("--reason", default="")
    revoke.add_argument("--broker")
    revoke.set_defaults(func=cmd_revoke_device)

    revoke_app = admin.add_parser("revoke-app", help="revoke an app instance and end its sessions")
    revoke_app.add_argument("app_id")
    revoke_app.add_argument("--reason", default="")
    revoke_app.add_argument("--broker")
    revoke_app.set_defaults(func=cmd_revoke_app)

    _add_fleet_audit_parser(sub)

    audit = sub.add_parser("audit", help="audit log").add_subparsers(
        dest="audit_command", required=True
    )
    audit.add_parser("verify", help="check the hash chain").set_defaults(func=cmd_audit_verify)

    factory = sub.add_parser("factory", help="simulated factory").add_subparsers(
        dest="factory_command", required=True
    )
    batch = factory.add_parser("batch", help="birth certificates for N simulated cameras")
    batch.add_argument("count", type=int)
    batch.add_argument("--prefix", default="cam")
    batch.set_defaults(func=cmd_factory_batch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``broker`` console script."""
    from broker.logs import configure_logging

    args = build_parser().parse_args(argv)
    log_format = getattr(args, "log_format", None) or os.environ.get("BROKER_LOG_FORMAT", "text")
    try:
        configure_logging(log_format)
    except ValueError as error:
        print(f"error: BROKER_LOG_FORMAT: {error}", file=sys.stderr)
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (BrokerError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
