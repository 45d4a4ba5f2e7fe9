"""The ``broker`` command: serve, PKI, device tokens, revocation, audit verification."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from broker.ca import PkiFiles, init_pki
from broker.client.admin import AdminClient, OperatorCredentials
from broker.clock import SystemClock
from broker.config import Config, from_environment
from broker.errors import BrokerError

log = logging.getLogger("broker")


def _config(args: argparse.Namespace) -> Config:
    return from_environment(Path(args.home) if args.home else None)


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.service.server import BrokerServer

    config = _config(args)
    if args.init_pki:
        _init(config)

    async def run() -> None:
        server = BrokerServer(config)
        ports = await server.start()
        print(
            f"broker serving: bootstrap {config.bootstrap_address.rsplit(':', 1)[0]}:{ports['bootstrap']}, "
            f"main :{ports['main']}, factory :{ports['factory']} (trust domain {config.trust_domain})",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("broker stopping", flush=True)
        await server.stop(2.0)

    asyncio.run(run())
    return 0


def _init(config: Config) -> int:
    from broker.devices import DeviceAuthority
    from broker.identity import from_certificate
    from broker.store.sqlite import SqliteStore

    report = init_pki(config, SystemClock())
    store = SqliteStore(config.database)
    try:
        from broker.ca import load_authority

        devices = DeviceAuthority(
            config, load_authority(config, SystemClock()), store, SystemClock()
        )
        for issued in (report.server, report.operator):
            if issued is not None:
                devices.register_local_certificate(
                    from_certificate(issued.certificate, config.trust_domain),
                    issued.certificate,
                    "broker ca init",
                )
    finally:
        store.close()
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
    from broker.audit import verify_chain
    from broker.store.sqlite import SqliteStore

    config = _config(args)
    if not config.database.exists():
        print(f"no database at {config.database}", file=sys.stderr)
        return 2
    store = SqliteStore(config.database, migrate=False)
    try:
        result = verify_chain(store.audit_entries())
    finally:
        store.close()
    if result.ok:
        print(f"audit log OK: {result.entries} entries, head {result.head_hash}")
        return 0
    print(f"audit log BROKEN at seq {result.first_bad_seq}: {result.reason}", file=sys.stderr)
    return 1


def cmd_factory_batch(args: argparse.Namespace) -> int:
    from broker.factory import make_batch

    config = _config(args)
    batch = make_batch(PkiFiles(config.certs_dir), args.count, SystemClock(), args.prefix)
    for item in batch:
        print(f"{item.device_id} {item.cert_path} {item.key_path}")
    print(f"{len(batch)} birth certificate(s) in {PkiFiles(config.certs_dir).factory_batches}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__)
    parser.add_argument(
        "--home", help="directory holding certs/ and var/ (default: $BROKER_HOME or cwd)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the broker in the foreground")
    serve.add_argument(
        "--init-pki", action="store_true", help="create the dev PKI first if missing"
    )
    serve.set_defaults(func=cmd_serve)

    ca = sub.add_parser("ca", help="PKI").add_subparsers(dest="ca_command", required=True)
    ca.add_parser("init", help="create the dev PKI (idempotent)").set_defaults(func=cmd_ca_init)

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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
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
