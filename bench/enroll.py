"""Enrollment throughput: Bootstrap.EnrollDevice against a real broker.

The broker runs in its own process on a bench home; the load comes from client processes using
grpc.aio over real TLS. Tokens and CSRs are made before the clock. Modes:

- reused:   a few long-lived TLS channels, many calls in flight;
- new-conn: a new channel (a full TLS handshake) for every enrollment, as a fleet of cameras does;
- baseline: GetTrustBundle over the reused channels (no core work, no store): the gRPC aio + TLS
  path alone.

Each mode runs several times; the median enrollments/s is the headline. In-process (no gRPC) the
core path is timed (CSR check, IssuingAuthority.issue, the store transaction, fsync), and the store
is checked at the end: one certificate, device row, used token and device.enrolled audit entry per
successful enrollment, and an intact audit chain.

    .venv/bin/python -m bench.enroll --quick     # 3 runs per mode
    .venv/bin/python -m bench.enroll             # 5 x 2000 reused, 5 x 500 new-conn
    .venv/bin/python -m bench.enroll --profile /tmp/prof   # + py-spy runs, not timed
    .venv/bin/python -m bench.enroll --store both  # SQLite and PostgreSQL, runs alternated
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc

from bench.harness import stores as backends
from bench.harness.broker import Broker, WhatIf, bench_config
from bench.harness.cli import bench_parser, parse
from bench.harness.fleet import Clients, Deferred, split
from bench.harness.profiling import PROFILES, profiled_runs, py_spy_binary
from bench.harness.provision import (
    Core,
    Item,
    audit_check,
    check_line,
    elapsed,
    make_items,
    read_store,
)
from bench.harness.stats import NCPU, Cost, measure, print_costs, us
from bench.harness.unary import (
    UnaryRun,
    drive,
    run_load,
    summary_header,
    summary_row,
)
from broker.config import Config


# ---------------------------------------------------------------------------------------------
# client process
# ---------------------------------------------------------------------------------------------
def _channel(target: str, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    # A local subchannel pool: without it grpc shares one TCP/TLS connection between channels to
    # the same target, and "new connection per enrollment" or "4 channels" would not be so.
    options = [
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.aio.secure_channel(target, credentials, options=options)


async def enroll_client(target: str, ca_pem: bytes) -> dict[str, Any]:
    from broker._proto.broker.v1 import bootstrap_pb2, bootstrap_pb2_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    stub_class: Any = bootstrap_pb2_grpc.BootstrapStub

    async def enroll(stub: Any, item: Item) -> None:
        device_id, token, csr = item
        response = await stub.EnrollDevice(
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr, enrollment_token=token), timeout=60
        )
        if response.device_id != device_id or not response.certificate_chain_pem.startswith(
            "-----BEGIN CERTIFICATE-----"
        ):
            raise ValueError("response names another device or carries no certificate")

    async def run(mode: str, items: list[Item], channels: int, concurrency: int) -> Deferred:
        reused = [
            _channel(target, credentials) for _ in range(channels if mode != "new-conn" else 0)
        ]
        await asyncio.gather(*(ch.channel_ready() for ch in reused))  # handshakes before the clock
        stubs = [stub_class(ch) for ch in reused]

        async def call(i: int) -> None:
            if mode == "baseline":
                response = await stubs[i % len(stubs)].GetTrustBundle(
                    bootstrap_pb2.GetTrustBundleRequest(), timeout=60
                )
                if not response.trust_bundle.ByteSize():
                    raise ValueError("empty trust bundle")
            elif mode == "reused":
                await enroll(stubs[i % len(stubs)], items[i])
            else:
                async with _channel(target, credentials) as channel:
                    await enroll(stub_class(channel), items[i])

        async def timed() -> dict[str, Any]:
            result = await drive(call, len(items), concurrency)
            for ch in reused:
                await ch.close()
            return result

        return Deferred(timed)

    return {"run": run}


def run_batch(load: Load, mode: str, batches: list[list[Item]], conc: int, k: int) -> UnaryRun:
    return load.run(mode, batches[k], conc)


class Load:
    def __init__(self, broker: Broker, clients: Clients, channels: int) -> None:
        self.broker, self.clients, self.channels = broker, clients, channels

    def run(self, mode: str, items: list[Item], concurrency: int) -> UnaryRun:
        k = len(self.clients)
        channels = max(1, self.channels // k) if mode != "new-conn" else 0
        commands = [
            ("run", mode, share, channels, max(1, concurrency // k)) for share in split(items, k)
        ]
        return run_load(self.broker, self.clients, commands, len(items))


# ---------------------------------------------------------------------------------------------
# in-process costs of the core path
# ---------------------------------------------------------------------------------------------
class PreIssued:
    """Stands in for IssuingAuthority with certificates signed beforehand (store-only timing)."""

    def __init__(self, issued: list[Any]) -> None:
        self._issued = iter(issued)

    def issue(self, *_args: Any, **_kwargs: Any) -> Any:
        return next(self._issued)


ISSUE = "IssuingAuthority.issue (sign leaf)"
STORE_FULL = "store tx, FULL, COMMIT per call"
STORE_NORMAL = "store tx, NORMAL, COMMIT per call"
STORE_GROUP = "store tx, FULL, 32 per COMMIT (as shipped)"
GROW_EMPTY = "enroll_with_token, empty store"
GROW_FULL = "enroll_with_token, after"
CORE = "DeviceAuthority.enroll_with_token"
BATCH = 32


def core_costs(config: Config, count: int, grow: int) -> list[Cost]:
    """Per-call cost of each piece of the enrollment core path, in this process, no gRPC."""
    from broker.client.device import make_csr
    from broker.identity.spiffe import device
    from broker.pki.ca import new_key
    from broker.pki.csr import public_key_from_csr

    base = Core(config)
    ca = base.ca
    base.close()
    total = count + grow
    keys = [new_key() for _ in range(total)]
    csrs = [make_csr(k) for k in keys]
    public = [k.public_key() for k in keys]
    lifetime = dt.timedelta(days=config.device_cert_days)

    def setup(
        prefix: str, pre_issued: bool, n: int = count, overrides: dict[str, Any] | None = None
    ) -> tuple[Core, list[str]]:
        cfg = bench_config(
            config.home, db_path=config.home / "var" / f"micro-{prefix}.db", **(overrides or {})
        )
        ids = [f"{prefix}-{i:06d}" for i in range(n)]
        issuer = (
            PreIssued(
                [ca.issue(public[i], device(cfg.trust_domain, ids[i]), lifetime) for i in range(n)]
            )
            if pre_issued
            else None
        )
        core = Core(cfg, issuer)
        return core, core.tokens(ids)

    csr = measure(
        "CSR parse + signature check",
        "broker.pki.csr.public_key_from_csr",
        lambda i: public_key_from_csr(csrs[i]),
        count,
    )
    identities = [device(config.trust_domain, f"micro-{i:06d}") for i in range(count)]
    rows = [
        csr,
        measure(
            ISSUE,
            "P-256 ECDSA, fixed profile, chain PEM",
            lambda i: ca.issue(public[i], identities[i], lifetime),
            count,
        ),
    ]
    syncs = [
        ("FULL", STORE_FULL, "enroll_with_token, pre-signed certs, less CSR"),
        ("NORMAL", STORE_NORMAL, "WAL + NORMAL, COMMIT per call"),
    ]
    for sync, name, note in syncs:
        core, tokens = setup(
            f"s{sync.lower()}",
            True,
            overrides=({"sqlite_synchronous": sync} if sync != "FULL" else {}),
        )

        def enroll(i: int, c: Core = core, t: list[str] = tokens) -> None:
            c.devices.enroll_with_token(csrs[i], t[i])

        cost = measure("", "", enroll, count)
        core.close()
        rows.append(cost.minus(csr, name, note))

    core, tokens = setup("group", True)

    def batch(b: int) -> None:
        with core.store.batch():
            for i in range(b * BATCH, min(count, (b + 1) * BATCH)):
                core.devices.enroll_with_token(csrs[i], tokens[i])

    batches = (count + BATCH - 1) // BATCH
    per = measure("", "", batch, batches).scaled(batches / count, "", "")
    core.close()
    rows.append(per.minus(csr, STORE_GROUP, "store.batch(): savepoint per call, one COMMIT"))

    core, tokens = setup("core", False)
    fresh = [make_csr(new_key()) for _ in range(count)]
    rows.append(
        measure(
            CORE,
            "the whole core call, COMMIT per call",
            lambda i: core.devices.enroll_with_token(fresh[i], tokens[i]),
            count,
        )
    )
    core.close()

    # Does the store transaction stay flat as the certificates table grows? Measured inside one
    # batch (no COMMIT per call), so only SQL and Python show: `count` enrollments into an empty
    # store, then `grow` more, then `count` again.
    core, tokens = setup("grow", False, n=total + count)
    more = [make_csr(new_key()) for _ in range(count)]
    with core.store.batch():
        first = measure(
            GROW_EMPTY,
            "inside one batch: SQL and Python only",
            lambda i: core.devices.enroll_with_token(csrs[i], tokens[i]),
            count,
        )
    for start in range(count, total, 500):
        with core.store.batch():
            for i in range(start, min(total, start + 500)):
                core.devices.enroll_with_token(csrs[i], tokens[i])
    with core.store.batch():
        last = measure(
            f"{GROW_FULL} {total:,} certs",
            "should equal the line above",
            lambda i: core.devices.enroll_with_token(more[i], tokens[total + i]),
            count,
        )
    core.close()
    rows += [first, last]

    fd = os.open(config.home / "var" / "fsync.probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:

        def write_sync(_i: int) -> None:
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)

        rows.append(
            measure(
                "fsync of a 4 KiB write",
                "same filesystem as the database",
                write_sync,
                min(count, 200),
            )
        )
    finally:
        os.close(fd)
    return rows


# ---------------------------------------------------------------------------------------------
# the store check
# ---------------------------------------------------------------------------------------------
def verify_store(config: Config, expected: int, tokens: list[str]) -> list[str]:
    """One device certificate, device row, used token and device.enrolled entry per success."""
    from broker.devices.onetime import secret_hash
    from broker.identity.spiffe import device

    problems: list[str] = []

    def count(tx: Any) -> tuple[int, int, int]:
        devices = tx.list_devices()
        certs = sum(
            len(tx.certificates_of(device(config.trust_domain, d.device_id).spiffe_id))
            for d in devices
        )
        used = sum(
            1
            for t in tokens
            if (r := tx.get_enrollment_token(secret_hash(t))) and r.used_at is not None
        )
        return len(devices), certs, used

    devices, certs, used = read_store(config, count)
    check_line("device certificate rows", certs, expected, problems)
    check_line("used tokens", used, expected, problems)
    check_line("device rows", devices, expected, problems)
    audit_check(config, problems, {"device.enrolled": expected})
    return problems


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(
        __doc__,
        "3 short runs per mode",
        "after the timed runs, one extra run per mode and profile under py-spy",
        runs="mode",
        stores=True,
    )
    p.add_argument("--n", type=int, help="enrollments per reused-channel run (2000, quick 1000)")
    p.add_argument("--n-new", type=int, help="enrollments per new-connection run (500, quick 300)")
    p.add_argument("--concurrency", type=int, default=64, help="in-flight calls, reused (64)")
    p.add_argument("--channels", type=int, default=4, help="TLS channels, reused mode (4)")
    p.add_argument("--new-concurrency", type=int, default=16, help="in flight, new-conn (16)")
    p.add_argument("--clients", type=int, default=1, help="client processes (1)")
    p.add_argument("--mode", choices=["both", "reused", "new-conn"], default="both")
    p.add_argument("--no-baseline", action="store_true", help="skip the GetTrustBundle run")
    p.add_argument(
        "--micro",
        type=int,
        help="samples per in-process measurement, on SQLite (500, quick 150; 0: skip)",
    )
    p.add_argument(
        "--grow",
        type=int,
        help="certificates added between the two table-growth samples (default 5000, quick 2000)",
    )
    w = p.add_argument_group("what-if experiments (change the broker process only, for evidence)")
    w.add_argument(
        "--server-sync",
        choices=["FULL", "NORMAL", "OFF"],
        help="SQLite synchronous mode of the broker (Config.sqlite_synchronous; SQLite only)",
    )
    w.add_argument(
        "--switch-interval",
        type=float,
        metavar="S",
        help="sys.setswitchinterval in the broker process (Python default 0.005)",
    )
    w.add_argument(
        "--inline-core",
        action="store_true",
        help="run core calls on the event loop instead of the broker-core thread",
    )
    w.add_argument(
        "--per-call-commit",
        action="store_true",
        help="group commit of 1: one COMMIT (fsync) per call",
    )
    w.add_argument(
        "--max-batch",
        type=int,
        metavar="N",
        help="group commit with at most N calls per COMMIT (broker default 128)",
    )
    args = parse(p, argv)
    args.n = args.n or (1000 if args.quick else 2000)
    args.n_new = args.n_new or (300 if args.quick else 500)
    args.micro = args.micro if args.micro is not None else (150 if args.quick else 500)
    args.grow = args.grow if args.grow is not None else (2000 if args.quick else 5000)
    args.what_if = WhatIf(
        switch_interval=args.switch_interval,
        inline_core=args.inline_core,
        max_batch=1 if args.per_call_commit else args.max_batch,
        synchronous=args.server_sync,
    )
    args.what_if.check(backends.chosen(args.store))
    if args.workers and args.what_if.describe():
        p.error("what-ifs change the in-process broker; --workers runs `broker serve` as shipped")
    return args


def prepare(config: Config, modes: list[str], plan: dict[str, tuple[int, int]], runs: int) -> Any:
    """Tokens in the store and CSRs, before any timing: a warm-up batch, then per mode one batch
    per run; returns (warm-up, items by mode, every token)."""
    warmup = make_items(config, "warm", 64)
    items = {
        mode: [make_items(config, f"{mode[0]}{r}", plan[mode][0]) for r in range(runs)]
        for mode in modes
    }
    tokens = [
        t for batch in [warmup, *(x for runs in items.values() for x in runs)] for _, t, _ in batch
    ]
    return warmup, items, tokens


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stores = backends.chosen(args.store, args.workers)
    modes = ["reused", "new-conn"] if args.mode == "both" else [args.mode]
    plan = {"reused": (args.n, args.concurrency), "new-conn": (args.n_new, args.new_concurrency)}
    t0 = time.monotonic()
    costs: list[Cost] = []
    comparisons: list[str] = []
    results: dict[str, dict[str, list[UnaryRun]]] = {}
    problems: list[str] = []
    with backends.store_homes("enroll", args.keep, stores, args.pg_url) as homes:
        print(
            f"enrollment benchmark: grpcio {grpc.__version__}, Python "
            f"{sys.version.split()[0]}, {NCPU} CPUs, stores {', '.join(backends.NAMES[s] for s in stores)}"
        )
        if backends.SQLITE in homes and args.micro:
            costs = core_costs(homes[backends.SQLITE], args.micro, args.grow)
            print_costs(
                f"in-process core path on SQLite ({args.micro} calls each, no gRPC, one thread):",
                costs,
            )

        py_spy = py_spy_binary(args.py_spy) if args.profile else None
        if args.profile and not py_spy:
            print("  (--profile: py-spy not found; pass --py-spy PATH)")
        extra = len(PROFILES) if py_spy else 0
        prepared = {}
        for store, config in homes.items():
            prep = time.monotonic()
            prepared[store] = prepare(config, modes, plan, args.runs + extra)
            print(
                f"\n{backends.NAMES[store]}: prepared {len(prepared[store][2])} tokens (in the store) and "
                f"CSRs in {elapsed(prep)}, before any timing"
            )
        if args.what_if.describe():
            print(f"WHAT-IF broker tweaks (not the broker as shipped): {args.what_if.describe()}")
        live: list[Any] = []
        loads: dict[str, Load] = {}
        everything: dict[str, list[UnaryRun]] = {s: [] for s in stores}
        errors = 0
        try:
            for store, config in homes.items():
                broker = backends.broker_on(
                    config, what_if=args.what_if, workers=backends.workers_of(store)
                )
                live.append(broker)
                ca_pem = (config.certs_dir / "ca-bundle.pem").read_bytes()
                clients = Clients(enroll_client, [(broker.bootstrap, ca_pem)] * args.clients)
                live.append(clients)
                loads[store] = Load(broker, clients, args.channels)
                print(
                    f"{backends.NAMES[store]} broker pid {broker.pid} ports {broker.ports}; "
                    f"{args.clients} client process(es)"
                )
                everything[store].append(
                    loads[store].run("reused", prepared[store][0], args.concurrency)
                )

            def runner(mode: str, conc: int) -> Callable[[str], backends.Runner]:
                return lambda s: lambda r: loads[s].run(mode, prepared[s][1][mode][r], conc)

            for mode in modes:
                n, conc = plan[mode]
                desc = (
                    f"{args.channels} channels, {conc} in flight"
                    if mode == "reused"
                    else f"new TLS connection per call, {conc} in flight"
                )
                print(f"\n{mode}: {args.runs} runs x {n} enrollments ({desc})")
                by_store = backends.interleave(
                    backends.runners(stores, runner(mode, conc)), args.runs, "enroll/s"
                )
                if line := backends.print_stores(mode, by_store, "enroll/s"):
                    comparisons.append(line)
                for store, runs in by_store.items():
                    results.setdefault(store, {})[mode] = runs
                    everything[store] += runs
            if not args.no_baseline:
                print(
                    f"\nbaseline: 1 run x {args.n} GetTrustBundle calls ({args.channels} "
                    f"channels, {args.concurrency} in flight; no core thread, no store)"
                )
                empty = [("", "", "")] * args.n

                def baseline(s: str) -> backends.Runner:
                    return lambda _r: loads[s].run("baseline", empty, args.concurrency)

                by_store = backends.interleave(backends.runners(stores, baseline), 1, "calls/s ")
                for store, runs in by_store.items():
                    results[store]["baseline"] = runs
                    errors += sum(runs[0].errors.values())
            for store in stores if py_spy else []:
                assert py_spy is not None and args.profile is not None
                load = loads[store]
                for mode in modes:
                    batches = prepared[store][1][mode][args.runs :]

                    def report(flavour: str, result: UnaryRun, what: str = mode) -> None:
                        print(
                            f"\n  profile {what} / {flavour}: {result.rate:,.0f} enroll/s under "
                            "the profiler (not in the figures)"
                        )

                    everything[store] += profiled_runs(
                        py_spy,
                        args.profile,
                        f"{store}-{mode}",
                        load.broker.pid,
                        functools.partial(run_batch, load, mode, batches, plan[mode][1]),
                        report,
                    )
        finally:
            for proc in reversed(live):
                proc.stop()

        for store, config in homes.items():
            print(f"\n{backends.NAMES[store]} store check after the broker stopped:")
            runs = everything[store]
            problems += [
                f"{backends.NAMES[store]}: {p}"
                for p in verify_store(config, sum(r.ok for r in runs), prepared[store][2])
            ]
            errors += sum(sum(r.errors.values()) for r in runs)
        if errors:
            problems.append(f"{errors} failed calls")

    print(
        "\nSUMMARY (baseline = GetTrustBundle, not an enrollment; GIL cap = calls/s of the "
        "broker's Python-thread CPU,\n the ceiling while one process serves everything; CPU cap "
        f"= {NCPU} cores / (broker + client CPU per call))"
    )
    print(f"  {'mode':<21}{summary_header()}")
    for store, by_mode in results.items():
        for mode, runs in by_mode.items():
            print(f"  {mode + ' ' + backends.NAMES[store]:<21}{summary_row(runs)}")
    for line in comparisons:
        print(f"  {line}")
    if costs:
        print_core_summary(costs)
    print(f"  correctness: {'OK' if not problems else 'FAILED: ' + '; '.join(problems)}")
    print(f"  total time {time.monotonic() - t0:.0f} s")
    return 0 if not problems else 1


def print_core_summary(costs: list[Cost]) -> None:
    by = {c.name: c for c in costs}
    print(
        f"  in-process medians (SQLite): CSR check {us(by['CSR parse + signature check'].median)}, "
        f"issue {us(by[ISSUE].median)}, store tx {us(by[STORE_FULL].median)} (FULL) / "
        f"{us(by[STORE_NORMAL].median)} (NORMAL) / {us(by[STORE_GROUP].median)} (32 per COMMIT), "
        f"whole core call {us(by[CORE].median)}"
    )
    grown = next(c for c in costs if c.name.startswith(GROW_FULL))
    ratio = grown.mean / by[GROW_EMPTY].mean
    print(
        f"  store scaling: enroll_with_token {us(by[GROW_EMPTY].mean)} on an empty store, "
        f"{us(grown.mean)} {grown.name[len('enroll_with_token, ') :]} "
        f"(x{ratio:.1f}{'; should be flat' if ratio > 1.3 else ''})"
    )


if __name__ == "__main__":
    sys.exit(main())
