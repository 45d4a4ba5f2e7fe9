"""OpenSession: AppService.OpenSession calls/s and p50/p99 latency against a real broker.

Setup, before any timing (core API on the broker's database before it starts): a few cameras, an
owner who claims every camera and shares each with every viewer, and the viewers' app instances.

Load: the broker as shipped in its own process; client processes hold one mutual-TLS channel per
app instance, opened before the clock and reused, and keep C calls in flight; every call carries
its own X25519 key, made before the clock. The matrix is client processes (1, 2) x calls in flight
(8, 32, 128), several runs per cell, each printing calls/s, p50, p99 and where the broker's CPU
went; each cell prints its medians. A sample of the tokens is verified as a camera would
(signature, aud, cnf = the app certificate, eph = the key sent). At the end the store is checked
(one session row and one session.opened audit entry per success, audit chain intact) and the pieces
of the path are timed in-process (signing, certificate check, grant read, Sessions.open, hop).

    .venv/bin/python -m bench.sessions                  # 5 runs per cell
    .venv/bin/python -m bench.sessions --quick          # 3 short runs per cell
    .venv/bin/python -m bench.sessions --clients 1      # the README's cells
    .venv/bin/python -m bench.sessions --store both     # SQLite and PostgreSQL, runs alternated
    .venv/bin/python -m bench.sessions --clients '' --compare per-call-commit switch-interval
        # what-ifs: one broker per what-if next to the matrix's, runs interleaved round robin
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from bench.harness import stores as backends
from bench.harness.broker import Broker, WhatIf
from bench.harness.cli import bench_parser, parse
from bench.harness.fleet import Clients, Deferred, split
from bench.harness.profiling import profiled_runs, py_spy_binary
from bench.harness.provision import (
    CHEAP_ARGON2,
    App,
    Core,
    audit_check,
    check_line,
    elapsed,
    provision,
    read_store,
)
from bench.harness.stats import NCPU, Cost, measure, print_costs, us
from bench.harness.unary import (
    UnaryRun,
    drive,
    print_breakdown,
    run_load,
    summary_header,
    summary_row,
)
from broker.config import Config

OPEN = "Sessions.open, as shipped"
WHAT_IFS = {
    "sync-normal": (
        "SQLite synchronous=NORMAL (no fsync per commit; Config.sqlite_synchronous)",
        WhatIf(synchronous="NORMAL"),
    ),
    "sync-off": (
        "synchronous=OFF (never fsync; not durable, an upper bound)",
        WhatIf(synchronous="OFF"),
    ),
    "per-call-commit": ("SQLite group commit of 1: one COMMIT per core call", WhatIf(max_batch=1)),
    "inline-core": (
        "core calls on the event loop thread (no hop; the loop blocks in fsync)",
        WhatIf(inline_core=True),
    ),
    "switch-interval": (
        "sys.setswitchinterval(0.0005) in the broker (Python's default 0.005)",
        WhatIf(switch_interval=0.0005),
    ),
}


# ---------------------------------------------------------------------------------------------
# client process
# ---------------------------------------------------------------------------------------------
async def sessions_client(
    target: str,
    ca_pem: bytes,
    apps: list[App],
    devices: list[str],
    jwks: str,
    issuer: str,
    trust_domain: str,
) -> dict[str, Any]:
    """One mutual-TLS channel per app instance, kept for every run."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import x25519
    from cryptography.hazmat.primitives.serialization import Encoding

    from broker._proto.broker.v1 import app_pb2, app_pb2_grpc
    from broker.clock import SystemClock
    from broker.identity.spiffe import device
    from broker.protocol.tokens import TokenVerifier, cert_thumbprint, key_hash

    options = [("grpc.use_local_subchannel_pool", 1)]  # really one connection per channel
    chains = [a.chain_pem for a in apps]
    channels = [
        grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(ca_pem, a.key_pem, chain), options
        )
        for a, chain in zip(apps, chains, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 180)
    stub_class: Any = app_pb2_grpc.AppServiceStub
    stubs = [stub_class(ch) for ch in channels]
    thumbprints = [
        cert_thumbprint(x509.load_pem_x509_certificate(c).public_bytes(Encoding.DER))
        for c in chains
    ]
    verifier = TokenVerifier(jwks, issuer, SystemClock())
    audiences = {d: device(trust_domain, d).spiffe_id for d in devices}

    def run(n: int, concurrency: int, offset: int, sample_every: int) -> Deferred:
        # Before the clock: one fresh X25519 key and one request message per call.
        keys = [
            x25519.X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(n)
        ]
        owner = [(offset + i) % len(stubs) for i in range(n)]
        dev = [devices[(owner[i] + (offset + i) // len(stubs)) % len(devices)] for i in range(n)]
        requests = [
            app_pb2.OpenSessionRequest(device_id=dev[i], app_ephemeral_public_key=keys[i])
            for i in range(n)
        ]
        samples: list[tuple[int, Any]] = []

        async def call(i: int) -> None:
            response = await stubs[owner[i]].OpenSession(requests[i], timeout=60)
            if i % sample_every == 0:
                samples.append((i, response))

        async def timed() -> dict[str, Any]:
            result = await drive(call, n, concurrency)
            bad = 0  # after the clock: check the sample as the camera would, and its bindings
            for i, response in samples:
                a = apps[owner[i]]
                try:
                    claims = verifier.verify(response.token, audiences[dev[i]])
                except Exception:
                    bad += 1
                    continue
                bad += (
                    claims.session_id,
                    claims.user_id,
                    claims.app_id,
                    claims.cnf_thumbprint,
                    claims.ephemeral_key_hash,
                ) != (
                    response.session_id,
                    a.user_id,
                    a.app_id,
                    thumbprints[owner[i]],
                    key_hash(keys[i]),
                )
            return {**result, "verified": len(samples), "bad_tokens": bad}

        return Deferred(timed)

    async def close() -> None:
        for ch in channels:
            await ch.close()

    return {"run": run, "close": close}


@dataclasses.dataclass
class Cell:
    label: str
    clients: int
    inflight: int
    runs: list[UnaryRun]
    store: str = backends.SQLITE


class Load:
    """One broker and `count` client processes sharing the app instances."""

    def __init__(self, broker: Broker, count: int, setup: tuple[Any, ...]) -> None:
        ca_pem, apps, *rest = setup
        self.broker = broker
        self.count = count
        self.clients = Clients(
            sessions_client, [(broker.main, ca_pem, share, *rest) for share in split(apps, count)]
        )

    def run(self, n: int, inflight: int, offset: int = 0) -> UnaryRun:
        per = [n // self.count + (1 if i < n % self.count else 0) for i in range(self.count)]
        commands = [
            ("run", per[i], max(1, inflight // self.count), offset + i, 50)
            for i in range(self.count)
        ]
        return run_load(self.broker, self.clients, commands, n)


# ---------------------------------------------------------------------------------------------
# in-process costs of the pieces (no gRPC), and the store check
# ---------------------------------------------------------------------------------------------
def micro_costs(config: Config, apps: list[App], devices: list[str], count: int) -> list[Cost]:
    """Per-call cost of each piece of the OpenSession path, on the bench's database."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, x25519

    from broker.clock import unix
    from broker.devices.ownership import require_grant
    from broker.identity.spiffe import Kind, device
    from broker.pki.ca import new_key
    from broker.protocol.tokens import (
        SCOPE_VIEW,
        SessionClaims,
        cert_thumbprint,
        key_hash,
        load_keyring,
    )
    from broker.service.peer import PeerParser
    from broker.sessions.sessions import Sessions

    core = Core(config)
    keyring = load_keyring(config.certs_dir)
    parser = PeerParser(config.trust_domain, [core.ca.certificate])
    pems = [a.chain_pem for a in apps]
    callers = [parser.parse(pem, Kind.APP) for pem in pems]
    thumbs = [cert_thumbprint(bytes.fromhex(c.fingerprint), prehashed=True) for c in callers]
    keys = [
        x25519.X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(count)
    ]
    now = unix(core.clock.now())

    def pick(i: int) -> tuple[Any, str, str]:
        a = i % len(callers)
        return callers[a], thumbs[a], devices[(i // len(callers) + a) % len(devices)]

    def claims(i: int) -> SessionClaims:
        caller, thumb, device_id = pick(i)
        return SessionClaims(
            config.broker_spiffe_id,
            caller.identity.name,
            device(config.trust_domain, device_id).spiffe_id,
            f"s-{i:024x}",
            SCOPE_VIEW,
            now,
            now + 300,
            thumb,
            key_hash(keys[i]),
            caller.identity.app_id,
        )

    def check(i: int) -> None:
        caller = pick(i)[0]
        core.devices.check_presented(
            caller.identity, caller.certificate, caller.serial, caller.fingerprint
        )

    def grant(i: int) -> None:
        caller, _, device_id = pick(i)
        with core.store.read() as tx:
            require_grant(tx, caller.identity.name, device_id, now)

    def open_session(sessions: Sessions, i: int) -> None:
        caller, thumb, device_id = pick(i % count)
        sessions.open(caller.identity, thumb, device_id, keys[i % count])

    all_claims = [claims(i) for i in range(count)]
    ecdsa = new_key()
    rows = [
        measure(
            "TokenKeyring.sign (ES256 JWT, PyJWT)",
            "broker.protocol.tokens",
            lambda i: keyring.sign(all_claims[i]),
            count,
        ),
        measure(
            "  of which ECDSA P-256 sign alone",
            "cryptography, a P-256 key, no JSON/base64",
            lambda _i: ecdsa.sign(b"x" * 400, ec.ECDSA(hashes.SHA256())),
            count,
        ),
        measure(
            "PeerParser.parse (cached, per call)",
            "interceptor: PEM -> Caller, once per PEM",
            lambda i: parser.parse(pems[i % len(pems)], Kind.APP),
            count,
        ),
        measure(
            "DeviceAuthority.check_presented",
            "interceptor, every RPC: cert + app row",
            check,
            count,
        ),
        measure(
            "require_grant in a read tx", "the I4 check alone (device + grant rows)", grant, count
        ),
    ]
    sessions = Sessions(config, core.store, core.clock, keyring)
    sqlite = backends.is_sqlite(config)
    full = measure(
        OPEN,
        "SQLite WAL, synchronous=FULL" if sqlite else "PostgreSQL, synchronous_commit=on",
        lambda i: open_session(sessions, i),
        count,
    )
    rows += [
        full,
        full.minus(
            rows[0],
            "  of which the store transaction",
            "grant reads, session insert, audit append, COMMIT",
        ),
    ]
    for sync in ("NORMAL", "OFF") if sqlite else ():
        c = Core(config.with_overrides(sqlite_synchronous=sync))
        s = Sessions(config, c.store, c.clock, keyring)

        def open_other(i: int, s: Sessions = s) -> None:
            open_session(s, i)

        rows.append(measure(f"Sessions.open, synchronous={sync}", "what-if", open_other, count))
        c.close()
    for size in (16, 64) if sqlite else ():

        def batch(b: int, size: int = size) -> None:
            with core.store.batch():
                for i in range(b * size, (b + 1) * size):
                    open_session(sessions, i)

        batches = max(3, count // size)
        rows.append(
            measure("", "", batch, batches).scaled(
                1 / size, f"Sessions.open, group commit of {size}", "FULL, one COMMIT per batch"
            )
        )
    core.close()
    if sqlite:
        rows.append(fsync_cost(config, count))

    async def hop() -> Cost:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1) as executor:
            samples = []
            for _ in range(count):
                started = time.perf_counter()
                await loop.run_in_executor(executor, int)
                samples.append(time.perf_counter() - started)
        median = sorted(samples)[len(samples) // 2]
        return Cost(
            "loop -> core thread -> loop hop",
            median,
            sum(samples) / count,
            0.0,
            "run_in_executor of a no-op, idle process; 2 per OpenSession",
        )

    rows.append(asyncio.run(hop()))
    return rows


def fsync_cost(config: Config, count: int) -> Cost:
    """An appended 4 KiB write and fsync, beside the SQLite database (as a WAL commit does)."""
    fd = os.open(
        config.database.parent / "fsync.probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    try:

        def write_sync(_i: int) -> None:
            os.write(fd, b"x" * 4096)  # appended, as a WAL commit grows the -wal file
            os.fsync(fd)

        return measure(
            "fsync of an appended 4 KiB write",
            "same filesystem as the database",
            write_sync,
            min(count, 200),
        )
    finally:
        os.close(fd)


def verify_store(config: Config, devices: list[str], expected: int) -> list[str]:
    """One session row and one session.opened audit entry per success, no denial, audit chain
    intact. Sessions opened before a broker restart are 'ended' by the restart."""
    problems: list[str] = []

    def outcomes(tx: Any) -> Counter[str]:
        return Counter(
            s.outcome.value + (f" ({s.reason})" if s.outcome.value == "ended" else "")
            for d in devices
            for s in tx.sessions_of_device(d)
        )

    found = read_store(config, outcomes)
    rows = found["opened"] + found["ended (broker restarted)"]
    check_line("session rows opened/ended", rows, expected, problems)
    check_line("other session rows (denied…)", sum(found.values()) - rows, 0, problems)
    print(f"    by outcome: {dict(found)}")
    audit_check(config, problems, {"session.opened": expected})
    return problems


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(
        __doc__,
        "3 short runs per cell",
        "after the timed runs, extra runs under py-spy (raw stacks to DIR)",
        runs="cell",
        stores=True,
    )
    p.add_argument("--n", type=int, help="OpenSession calls per run (default 5000, quick 1000)")
    p.add_argument("--concurrency", default="8,32,128", help="calls in flight, comma list")
    p.add_argument("--clients", default="1,2", help="client process counts, comma list (1,2)")
    p.add_argument("--users", type=int, help="viewer accounts (default 200, quick 100)")
    p.add_argument("--apps-per-user", type=int, default=1, help="app instances per viewer (1)")
    p.add_argument("--devices", type=int, default=4, help="cameras, shared with every viewer (4)")
    p.add_argument(
        "--micro", type=int, help="samples per in-process measurement (400, quick 120; 0: skip)"
    )
    p.add_argument(
        "--what-if", default="", help=f"broker tweaks for the matrix: {','.join(WHAT_IFS)}"
    )
    p.add_argument(
        "--compare",
        nargs="*",
        default=[],
        metavar="WHATIF",
        help="after the matrix, a broker per what-if, one cell, runs interleaved",
    )
    p.add_argument("--compare-cell", default="1x128", help="CLIENTSxINFLIGHT for --compare")
    args = parse(p, argv)
    args.n = args.n or (1000 if args.quick else 5000)
    args.users = args.users or (100 if args.quick else 200)
    args.micro = args.micro if args.micro is not None else (120 if args.quick else 400)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.clients = [int(x) for x in args.clients.split(",") if x]
    for name in [args.what_if, *args.compare]:
        if name and name not in WHAT_IFS:
            p.error(f"unknown what-if {name!r}; choose from {', '.join(WHAT_IFS)}")
        if name:
            WHAT_IFS[name][1].check(backends.chosen(args.store))
    if args.workers and (args.what_if or args.compare):
        p.error("what-ifs change the in-process broker; --workers runs `broker serve` as shipped")
    if args.compare and args.store == "both":
        p.error("--compare runs on one store: pass --store sqlite or --store postgres")
    clients, _, inflight = args.compare_cell.partition("x")
    args.compare_cell = (int(clients), int(inflight))
    return args


def compare(
    args: argparse.Namespace,
    config: Config,
    baseline: Broker,
    setup: tuple[Any, ...],
    cells: list[Cell],
    offset: int,
    live: list[Any],
) -> int:
    """The matrix's broker against a broker per what-if, one cell, runs interleaved (rotating
    the order) so that outside load hits every variant alike. Returns the warm-up successes."""
    count, inflight = args.compare_cell
    print(
        f"\nCOMPARE {count} client process(es) x {inflight} in flight, runs interleaved; "
        "what-ifs are not the broker as shipped:"
    )
    brokers = {args.what_if or "as shipped": baseline}
    for name in args.compare:
        print(f"  {name}: {WHAT_IFS[name][0]}")
        brokers[name] = backends.broker_on(config, CHEAP_ARGON2, WHAT_IFS[name][1])
        live.append(brokers[name])
    loads = {name: Load(proc, count, setup) for name, proc in brokers.items()}
    live += [load.clients for load in loads.values()]
    warm = sum(load.run(2 * len(setup[1]), inflight, offset).ok for load in loads.values())
    names = list(loads)

    def runner(name: str) -> backends.Runner:
        return lambda r: loads[name].run(args.n, inflight, offset + 31 * r + names.index(name))

    results = backends.interleave(
        {name: runner(name) for name in names}, args.runs, "sessions/s", 20
    )
    for name, runs in results.items():
        print(f"\n{name}: {count} client process(es), {inflight} in flight")
        print_breakdown(runs, "sessions/s")
        cells.append(Cell(f"{name} (cmp)", count, inflight, runs))
    return warm


class Side:
    """One store: its home, provisioned fleet, broker as the matrix runs it."""

    def __init__(self, store: str, config: Config, args: argparse.Namespace) -> None:
        self.store, self.config = store, config
        prep = time.monotonic()
        fleet = provision(config, args.devices, 1, args.users, args.apps_per_user)
        self.apps, self.devices = fleet.viewers, [c.device_id for c in fleet.cameras]
        print(
            f"{backends.NAMES[store]} setup: {len(self.devices)} cameras, {args.users} viewers x "
            f"{args.apps_per_user} app instance(s) = {len(self.apps)} app certificates, "
            f"{args.users * len(self.devices)} shares (core API, before the broker starts) in "
            f"{elapsed(prep)} (untimed)"
        )
        self.setup = (
            fleet.ca_pem,
            self.apps,
            self.devices,
            fleet.jwks_json,
            fleet.issuer,
            fleet.trust_domain,
        )
        self.broker = backends.broker_on(
            config,
            CHEAP_ARGON2,
            WHAT_IFS[args.what_if][1] if args.what_if else None,
            backends.workers_of(store),
        )
        print(
            f"{backends.NAMES[store]} broker pid {self.broker.pid} main port {self.broker.ports['main']}"
        )
        self.successes = 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stores = backends.chosen(args.store, args.workers)
    t0 = time.monotonic()
    live: list[Any] = []  # processes to stop at the end
    cells: list[Cell] = []
    comparisons: list[str] = []
    costs: dict[str, list[Cost]] = {}
    problems: list[str] = []
    label = args.what_if or "as shipped"
    with backends.store_homes("sessions", args.keep, stores, args.pg_url, **CHEAP_ARGON2) as homes:
        print(
            f"OpenSession benchmark: grpcio {grpc.__version__}, Python "
            f"{sys.version.split()[0]}, {NCPU} CPUs, stores {', '.join(backends.NAMES[s] for s in stores)}"
        )
        if args.what_if:
            print(f"\nWHAT-IF for the whole matrix: {args.what_if}: {WHAT_IFS[args.what_if][0]}")
        sides: dict[str, Side] = {}
        offset = 0
        try:
            for store, config in homes.items():
                sides[store] = Side(store, config, args)
                live.append(sides[store].broker)
            print(
                "each app instance holds its own mTLS channel, opened before the clock and reused"
            )
            for count in args.clients:
                loads = {s: Load(side.broker, count, side.setup) for s, side in sides.items()}
                live += [load.clients for load in loads.values()]
                for s, load in loads.items():  # warm-up
                    sides[s].successes += load.run(
                        2 * len(sides[s].apps), max(args.concurrency), offset
                    ).ok
                for inflight in args.concurrency:

                    def runner(
                        s: str, inflight: int = inflight, base: int = offset, ls: Any = loads
                    ) -> backends.Runner:
                        return lambda r: ls[s].run(args.n, inflight, base + r * 7919)

                    title = f"{label}, {count} client process(es) x {inflight} in flight"
                    print(f"\n{title}: {args.runs} runs x {args.n} OpenSession")
                    by_store = backends.interleave(
                        backends.runners(stores, runner), args.runs, "sessions/s"
                    )
                    if line := backends.print_stores(title, by_store, "sessions/s"):
                        comparisons.append(line)
                    for s, runs in by_store.items():
                        name = label if len(stores) == 1 else f"{label}, {backends.NAMES[s]}"
                        cells.append(Cell(name, count, inflight, runs, s))
                    offset += 1
                profile(args, count, sides, loads)
                for load in loads.values():
                    load.clients.stop()
            if args.compare:
                side = sides[stores[0]]
                side.successes += compare(
                    args, side.config, side.broker, side.setup, cells, offset, live
                )
        finally:
            for proc in reversed(live):
                proc.stop()

        for store, side in sides.items():
            runs = [r for cell in cells if cell.store == store for r in cell.runs]
            successes = side.successes + sum(r.ok for r in runs)
            errors = sum(sum(r.errors.values()) for r in runs)
            bad = sum(r.extra.get("bad_tokens", 0) for r in runs)
            print(f"\n{backends.NAMES[store]} store check after the broker stopped:")
            found = verify_store(side.config, side.devices, successes)
            print(
                f"  tokens verified like a camera "
                f"{sum(r.extra.get('verified', 0) for r in runs):>12,}  bad {bad}  "
                f"{'ok' if not bad else 'BAD'}"
            )
            if bad:
                found.append(f"{bad} sampled tokens failed verification or binding")
            if errors:
                found.append(f"{errors} failed OpenSession calls")
            problems += [f"{backends.NAMES[store]}: {p}" for p in found]
            if args.micro:
                costs[store] = micro_costs(side.config, side.apps, side.devices, args.micro)
                print_costs(
                    f"in-process pieces on {backends.NAMES[store]} (median of {args.micro} calls, no gRPC, "
                    "after the check):",
                    costs[store],
                )

    print("\nSUMMARY (medians over runs; goal: 8,000 sessions/s on 2 cores, p99 < 10 ms)")
    print(f"  {'broker':<26}{'clients':>8}{'inflight':>9}{summary_header()}")
    for cell in cells:
        print(f"  {cell.label:<26}{cell.clients:>8}{cell.inflight:>9}{summary_row(cell.runs)}")
    for line in comparisons:
        print(f"  {line}")
    for store, rows in costs.items():
        by = {c.name: c.median for c in rows}
        variants = " / ".join(
            f"{us(by[name])} ({tag})"
            for name, tag in (
                ("Sessions.open, synchronous=NORMAL", "NORMAL"),
                ("Sessions.open, group commit of 64", "group commit 64"),
            )
            if name in by
        )
        print(
            f"  in-process on {backends.NAMES[store]}: sign {us(by['TokenKeyring.sign (ES256 JWT, PyJWT)'])}, "
            f"check_presented {us(by['DeviceAuthority.check_presented'])}, Sessions.open "
            f"{us(by[OPEN])}{' / ' + variants if variants else ''}, hop "
            f"{us(by['loop -> core thread -> loop hop'])}"
        )
    print(
        "  (srv CPU = broker CPU per call; GIL cap = calls/s if the broker's Python threads were "
        f"the only limit;\n   CPU cap = {NCPU} cores / (broker + client CPU per call); others = "
        "median cores used by processes outside this benchmark)"
    )
    print(f"  correctness: {'OK' if not problems else 'FAILED: ' + '; '.join(problems)}")
    print(f"  total time {time.monotonic() - t0:.0f} s")
    return 0 if not problems else 1


def profile(
    args: argparse.Namespace, count: int, sides: dict[str, Side], loads: dict[str, Load]
) -> None:
    """--profile: extra runs under py-spy with the first client count, not in the figures."""
    if not args.profile or count != args.clients[0]:
        return
    py_spy = py_spy_binary(args.py_spy)
    if not py_spy:
        print("  (--profile: py-spy not found; pass --py-spy PATH)")
        return
    for store, side in sides.items():

        def report(flavour: str, result: UnaryRun, name: str = backends.NAMES[store]) -> None:
            print(
                f"\n  profile {name} {flavour}: {result.rate:,.0f} sessions/s under the "
                "profiler (not in the figures)"
            )

        def run(_k: int, load: Load = loads[store]) -> UnaryRun:
            return load.run(args.n, max(args.concurrency), 104729)

        done = profiled_runs(
            py_spy,
            args.profile,
            f"sessions-{store}",
            side.broker.pid,
            run,
            report,
        )
        side.successes += sum(r.ok for r in done)


if __name__ == "__main__":
    sys.exit(main())
