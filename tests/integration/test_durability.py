"""Durability under SIGKILL and rate-limit budgets kept in the store (issue 10, items 6 and 7), on
SQLite and on PostgreSQL (the postgres cases skip with tests.pg's reason when BROKER_TEST_POSTGRES
is unset).

Invariants these tests name:
- D1 (I8, I12, issue 10 item 7) nothing acknowledged is lost: a reply is sent only after its commit
  is durable, so every enrollment, sign-up, app enrollment, claim and session the broker answered
  OK survives a SIGKILL of the broker process, with its audit entry.
- D2 (I8) a consumed single-use secret stays consumed across a kill: re-using an acknowledged
  enrollment token after restarts is PERMISSION_DENIED and writes nothing but its denial entry.
- D3 (I12) the audit hash chain verifies (`broker audit verify` exits 0) after kills, after clean
  restarts and after two processes appended to it at once.
- R1 (issue 10 item 6) a failure budget survives a restart: a user locked out by wrong passwords
  stays RESOURCE_EXHAUSTED on a new broker process over the same store; others are not affected.
- R2 (I8, DESIGN "rate limits read shared state") two brokers on one store spend ONE per-device
  budget of wrong claim codes; once it is spent both refuse even the right code, and nothing is
  granted.

`broker serve` runs as a real subprocess (`python -m broker`) on port 0 in a temporary home; load
comes from this process over real TLS/mTLS with raw gRPC stubs. Every loop is bounded in count and
time; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from broker._proto.broker.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    app_pb2,
    app_pb2_grpc,
    bootstrap_pb2,
    bootstrap_pb2_grpc,
)
from broker.audit.chain import AuditEntry, verify_chain
from broker.config import Config
from broker.devices.onetime import secret_hash
from broker.devices.ownership import CLAIM_REFUSED
from broker.pki.ca import PkiFiles
from broker.store import Role, SessionOutcome, Store, Transaction
from broker.store.open import open_store
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    PASSWORD,
    AppCreds,
    RunningBroker,
    audit_entries,
    bootstrap_stub,
    claim_code_hash_of,
    create_account,
    csr_for,
    device_spiffe,
    enroll_camera,
    grant_rows,
    key_pem,
    mtls_channel,
    new_user,
    operator_channel_of,
    p256,
    read_store,
    retry_delay,
    rpc_error,
    table_counts,
    uncontracted_rows,
)
from tests.pg import fresh_database, integration_backend

T = TypeVar("T")

SQLITE_URL = "sqlite:///var/broker.db"
RPC_TIMEOUT = 5.0
SERVING = re.compile(r"^broker serving: bootstrap \S+:(\d+), main :(\d+), factory :(\d+)")
AUDIT_OK = re.compile(r"^audit log OK: (\d+) entries, head \w+$", re.MULTILINE)

# Durability run: kills, workers, and the bounds on every phase.
KILLS = 3
WORKERS = 6
LOAD_BEFORE_KILL = 12  # acknowledged items a phase must see before its kill may land
MAX_WARMUP_SECONDS = 8.0
KILL_DELAY_SECONDS = (0.3, 2.5)  # random extra time under load before the SIGKILL
PHASE_SECONDS = 15.0  # hard bound on one phase's load
# Refusals a worker tolerates before the kill (the broker shedding, PostgreSQL contention after
# its bounded retries, a slow reply on a loaded machine): the item is simply not acknowledged.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The store of record under test: SQLite under the broker home, or a fresh PostgreSQL
    database (dropped afterwards; skips when BROKER_TEST_POSTGRES is unset). These tests pick
    their backends themselves, so the suite's PostgreSQL pass (BROKER_TEST_BACKEND=postgres)
    skips the SQLite case, which the default pass already ran."""
    if request.param == "sqlite" and integration_backend() == "postgres":
        pytest.skip("SQLite case: runs in the default (SQLite) pass of the integration suite")
    if request.param == "postgres":
        with fresh_database() as url:
            yield url
    else:
        yield SQLITE_URL


# -- a broker process ------------------------------------------------------------------------------


class BrokerProcess:
    """`python -m broker serve` on a home and store, every listener on port 0."""

    def __init__(self, home: Path, store_url: str) -> None:
        self.home = home
        self.store_url = store_url
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        self.env = {
            **env,
            "BROKER_HOME": str(home),
            "BROKER_STORE": store_url,
            "BROKER_BOOTSTRAP_ADDRESS": "127.0.0.1:0",
            "BROKER_MAIN_ADDRESS": "127.0.0.1:0",
            "BROKER_FACTORY_ADDRESS": "127.0.0.1:0",
        }
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.bootstrap = ""
        self.main = ""

    @property
    def config(self) -> Config:
        """The configuration the process runs with (for opening its store from the test)."""
        return Config(home=self.home, store_url=self.store_url)

    @property
    def files(self) -> PkiFiles:
        return PkiFiles(self.home / "certs")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One `broker --home H <args>` run with this store (BROKER_STORE), to completion."""
        return subprocess.run(
            [sys.executable, "-m", "broker", "--home", str(self.home), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        output: list[str] = []
        self.output = output
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "--home", str(self.home), "serve"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.process = process
        ready = threading.Event()
        ports: list[str] = []

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                output.append(line)
                match = SERVING.match(line)
                if match:
                    ports.extend(match.groups())
                    ready.set()

        threading.Thread(target=pump, name="broker-output", daemon=True).start()
        deadline = time.monotonic() + 30
        while not ready.wait(0.1):
            if process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail("broker serve did not start:\n" + "".join(output[-40:]))
        self.bootstrap = f"127.0.0.1:{ports[0]}"
        self.main = f"127.0.0.1:{ports[1]}"

    def kill(self) -> None:
        """SIGKILL: no drain, no shutdown hook, no final commit."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM (the broker drains and exits), SIGKILL if it does not within 10 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def operator_channel(self) -> grpc.Channel:
        files = self.files
        return mtls_channel(
            self.main,
            files.ca_bundle.read_bytes(),
            files.operator_key.read_bytes(),
            files.operator_chain.read_bytes(),
        )

    def bootstrap_channel(self) -> grpc.Channel:
        ca_pem = self.files.ca_bundle.read_bytes()
        return grpc.secure_channel(self.bootstrap, grpc.ssl_channel_credentials(ca_pem))

    def app_channel(self, creds: AppCreds) -> grpc.Channel:
        return mtls_channel(
            self.main,
            self.files.ca_bundle.read_bytes(),
            key_pem(creds.key),
            creds.chain_pem.encode(),
        )


def init_home(home: Path, store_url: str) -> BrokerProcess:
    """The dev PKI, created once with `broker ca init` (which registers the operator and broker
    certificates in the store)."""
    process = BrokerProcess(home, store_url)
    result = process.cli("ca", "init")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "dev PKI ready" in result.stdout, result.stdout
    return process


def audit_verify(process: BrokerProcess) -> int:
    """`broker --home H audit verify` with BROKER_STORE: must exit 0 and say "audit log OK"
    (D3); returns the number of entries it checked."""
    result = process.cli("audit", "verify")
    assert result.returncode == 0, (result.stdout, result.stderr)
    match = AUDIT_OK.search(result.stdout)
    assert match, result.stdout
    return int(match.group(1))


def read_config(config: Config, query: Callable[[Transaction], T]) -> T:
    """query in one read snapshot of a separate connection to the store (the store contract)."""
    store: Store = open_store(config, migrate=False)
    try:
        with store.read() as tx:
            return query(tx)
    finally:
        store.close()


# -- D1: what the broker acknowledged ------------------------------------------------------------


@dataclass(frozen=True)
class AckedDevice:
    device_id: str
    serial: str
    token: str


@dataclass(frozen=True)
class AckedApp:
    app_id: str
    user_id: str
    serial: str


@dataclass(frozen=True)
class AckedSession:
    session_id: str
    device_id: str
    user_id: str
    app_id: str


@dataclass
class Ledger:
    """Every item the broker answered OK, recorded right after the reply (thread-safe)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    users: dict[str, str] = field(default_factory=dict)  # user_id -> username
    apps: list[AckedApp] = field(default_factory=list)
    devices: list[AckedDevice] = field(default_factory=list)
    grants: list[tuple[str, str]] = field(default_factory=list)  # (device_id, user_id)
    sessions: list[AckedSession] = field(default_factory=list)
    in_flight: int = 0

    def total(self) -> int:
        with self.lock:
            return (
                len(self.users)
                + len(self.apps)
                + len(self.devices)
                + len(self.grants)
                + len(self.sessions)
            )

    def summary(self) -> str:
        with self.lock:
            return (
                f"{len(self.users)} users, {len(self.apps)} app instances, "
                f"{len(self.devices)} enrollments (tokens consumed), {len(self.grants)} claims, "
                f"{len(self.sessions)} sessions"
            )


def serial_of(chain_pem: str) -> str:
    from cryptography import x509

    return f"{x509.load_pem_x509_certificates(chain_pem.encode())[0].serial_number:x}"


class Worker:
    """One client thread: sign-ups, an app enrollment, then rounds of enroll → claim → open
    session. It keeps its app instance and owned devices across kills; an item whose RPC failed
    is never retried (its outcome is unknown, so nothing is assumed about it)."""

    def __init__(self, index: int, ledger: Ledger, rng: random.Random) -> None:
        self.index = index
        self.ledger = ledger
        self.rng = rng
        self.app: AppCreds | None = None
        self.owned: list[str] = []
        self.seq = 0
        self.interrupted: list[grpc.StatusCode] = []  # codes of RPCs cut by the kill
        self.transient = 0  # TRANSIENT refusals before the kill
        self.errors: list[str] = []  # anything else: fails the test

    def name(self, kind: str) -> str:
        self.seq += 1
        return f"{kind}{self.index}x{self.seq}"

    def call(self, method: Callable[..., T], request: object) -> T:
        with self.ledger.lock:
            self.ledger.in_flight += 1
        try:
            return method(request, timeout=RPC_TIMEOUT)
        finally:
            with self.ledger.lock:
                self.ledger.in_flight -= 1

    def run_phase(
        self, broker: BrokerProcess, killed: threading.Event, stop: threading.Event
    ) -> None:
        """Load until stop, the kill, or PHASE_SECONDS; a failed check in this thread is kept
        in errors (which fail the test) instead of dying with the thread."""
        try:
            self._load(broker, killed, stop)
        except Exception as error:
            self.errors.append(f"worker {self.index}: {error!r}")

    def _load(self, broker: BrokerProcess, killed: threading.Event, stop: threading.Event) -> None:
        deadline = time.monotonic() + PHASE_SECONDS
        with (
            broker.bootstrap_channel() as boot_channel,
            broker.operator_channel() as op_channel,
        ):
            boot = bootstrap_pb2_grpc.BootstrapStub(boot_channel)
            admin = admin_pb2_grpc.AdminServiceStub(op_channel)
            app_channel: grpc.Channel | None = None
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    try:
                        if self.app is None:
                            self.sign_up(boot, with_app=True)
                            continue
                        if app_channel is None:
                            app_channel = broker.app_channel(self.app)
                        self.round(boot, admin, app_pb2_grpc.AppServiceStub(app_channel))
                    except grpc.RpcError as error:
                        code = error.code()
                        if killed.is_set():
                            self.interrupted.append(code)
                            return
                        if code in TRANSIENT:
                            self.transient += 1
                            time.sleep(0.05)
                            continue
                        self.errors.append(f"worker {self.index}: {code.name}: {error.details()}")
                        return
            finally:
                if app_channel is not None:
                    app_channel.close()

    def sign_up(self, boot: bootstrap_pb2_grpc.BootstrapStub, *, with_app: bool) -> None:
        username = self.name("user")
        response = self.call(
            boot.CreateAccount,
            bootstrap_pb2.CreateAccountRequest(username=username, password=PASSWORD),
        )
        user_id = str(response.user_id)
        with self.ledger.lock:
            self.ledger.users[user_id] = username
        if not with_app:
            return
        key = p256()
        enrolled = self.call(
            boot.EnrollApp,
            bootstrap_pb2.EnrollAppRequest(
                username=username, password=PASSWORD, csr_pem=csr_for(key), label="durable"
            ),
        )
        chain = str(enrolled.certificate_chain_pem)
        app_id = str(enrolled.app_id)
        assert str(enrolled.user_id) == user_id
        with self.ledger.lock:
            self.ledger.apps.append(AckedApp(app_id, user_id, serial_of(chain)))
        self.app = AppCreds(user_id, app_id, str(enrolled.spiffe_id), key, chain)
        self.owned = []

    def round(
        self,
        boot: bootstrap_pb2_grpc.BootstrapStub,
        admin: admin_pb2_grpc.AdminServiceStub,
        app: app_pb2_grpc.AppServiceStub,
    ) -> None:
        assert self.app is not None
        if self.seq % 4 == 0:  # a sign-up without an app instance now and then
            self.sign_up(boot, with_app=False)
        device_id = self.name("cam")
        token = str(
            self.call(
                admin.CreateEnrollmentToken,
                admin_pb2.CreateEnrollmentTokenRequest(device_id=device_id),
            ).enrollment_token
        )
        enrolled = self.call(
            boot.EnrollDevice,
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_for(p256()), enrollment_token=token),
        )
        assert str(enrolled.device_id) == device_id
        with self.ledger.lock:
            self.ledger.devices.append(
                AckedDevice(device_id, serial_of(str(enrolled.certificate_chain_pem)), token)
            )
        self.call(
            app.ClaimDevice,
            app_pb2.ClaimDeviceRequest(device_id=device_id, claim_code=str(enrolled.claim_code)),
        )
        with self.ledger.lock:
            self.ledger.grants.append((device_id, self.app.user_id))
        self.owned.append(device_id)
        target = self.rng.choice(self.owned)
        opened = self.call(
            app.OpenSession,
            app_pb2.OpenSessionRequest(device_id=target, app_ephemeral_public_key=os.urandom(32)),
        )
        with self.ledger.lock:
            self.ledger.sessions.append(
                AckedSession(str(opened.session_id), target, self.app.user_id, self.app.app_id)
            )


def load_until_killed(
    broker: BrokerProcess, workers: list[Worker], rng: random.Random
) -> tuple[int, int]:
    """Run every worker against broker, SIGKILL it mid-load, wait for the workers; returns
    (items acknowledged in this phase, RPCs in flight at the kill)."""
    killed, stop = threading.Event(), threading.Event()
    before = workers[0].ledger.total()
    threads = [
        threading.Thread(target=w.run_phase, args=(broker, killed, stop), daemon=True)
        for w in workers
    ]
    for thread in threads:
        thread.start()
    warmup_end = time.monotonic() + MAX_WARMUP_SECONDS
    while workers[0].ledger.total() - before < LOAD_BEFORE_KILL and time.monotonic() < warmup_end:
        time.sleep(0.02)
    time.sleep(rng.uniform(*KILL_DELAY_SECONDS))
    ledger = workers[0].ledger
    killed.set()
    with ledger.lock:
        in_flight = ledger.in_flight
    broker.kill()
    stop.set()
    for thread in threads:
        thread.join(PHASE_SECONDS + RPC_TIMEOUT + 5)
        assert not thread.is_alive(), "a worker did not finish its phase"
    return ledger.total() - before, in_flight


def check_everything_acknowledged_exists(config: Config, ledger: Ledger) -> None:
    """D1 through the store contract: every acknowledged item, its certificate and its audit
    entry; D2's precondition: every acknowledged enrollment's token is consumed."""

    def missing(tx: Transaction) -> list[str]:
        lost: list[str] = []
        for user_id, username in ledger.users.items():
            user = tx.get_user(user_id)
            if user is None or user.username != username:
                lost.append(f"user {user_id} ({username})")
        for app in ledger.apps:
            app_record = tx.get_app(app.app_id)
            cert = tx.get_certificate(app.serial)
            if app_record is None or app_record.user_id != app.user_id or cert is None:
                lost.append(f"app instance {app.app_id} / certificate {app.serial}")
        for device in ledger.devices:
            record = tx.get_device(device.device_id)
            cert = tx.get_certificate(device.serial)
            token = tx.get_enrollment_token(secret_hash(device.token))
            if record is None:
                lost.append(f"device {device.device_id}")
            if cert is None or cert.spiffe_id != device_spiffe(device.device_id):
                lost.append(f"certificate {device.serial} of {device.device_id}")
            if token is None or token.used_at is None or token.device_id != device.device_id:
                lost.append(f"consumed token of {device.device_id}: {token}")
        for device_id, user_id in ledger.grants:
            grant = tx.get_grant(device_id, user_id)
            if grant is None or grant.role is not Role.OWNER:
                lost.append(f"owner grant ({device_id}, {user_id}): {grant}")
            record = tx.get_device(device_id)
            if record is None or record.claim_code_hash is not None:
                lost.append(f"claim code of {device_id} not consumed")
        for session in ledger.sessions:
            row = tx.get_session(session.session_id)
            if row is None or (row.device_id, row.user_id, row.app_id) != (
                session.device_id,
                session.user_id,
                session.app_id,
            ):
                lost.append(f"session {session.session_id}: {row}")
            elif row.outcome not in (SessionOutcome.OPENED, SessionOutcome.ENDED):
                lost.append(f"session {session.session_id} outcome {row.outcome}")
        return lost

    lost = read_config(config, missing)
    assert lost == [], f"{len(lost)} acknowledged item(s) lost: {lost[:20]}"

    store: Store = open_store(config, migrate=False)
    try:
        entries = list(store.audit_entries())
    finally:
        store.close()
    assert verify_chain(entries).ok

    def audited(action: str, key: Callable[[AuditEntry], object]) -> set[object]:
        return {key(e) for e in entries if e.action == action}

    unaudited: dict[str, AbstractSet[object]] = {
        "user.created": set(ledger.users) - audited("user.created", lambda e: e.subject),
        "app.enrolled": {a.app_id for a in ledger.apps}
        - audited("app.enrolled", lambda e: e.detail.get("app_id")),
        "device.enrolled": {d.device_id for d in ledger.devices}
        - audited("device.enrolled", lambda e: e.subject),
        "device.claimed": set(ledger.grants)
        - audited("device.claimed", lambda e: (e.subject, e.detail.get("user_id"))),
        "session.opened": {s.session_id for s in ledger.sessions}
        - audited("session.opened", lambda e: e.detail.get("session_id")),
    }
    assert all(not items for items in unaudited.values()), unaudited


def check_consumed_tokens_stay_consumed(broker: BrokerProcess, ledger: Ledger) -> int:
    """D2: every acknowledged enrollment token, presented again with a fresh key, is
    PERMISSION_DENIED; nothing is written but one `device.enroll.denied` entry per attempt (no
    device, certificate or token change). Returns the number of tokens re-tried."""
    config = broker.config

    def snapshot(tx: Transaction) -> dict[str, object]:
        return {
            d.device_id: (
                tx.get_device(d.device_id),
                [c.serial for c in tx.certificates_of(device_spiffe(d.device_id))],
                tx.get_enrollment_token(secret_hash(d.token)),
            )
            for d in ledger.devices
        } | {"#devices": len(tx.list_devices())}

    before = read_config(config, snapshot)
    entries_before = audit_verify(broker)
    codes: list[grpc.StatusCode] = []
    with broker.bootstrap_channel() as channel:
        stub = bootstrap_pb2_grpc.BootstrapStub(channel)
        for device in ledger.devices:
            error = rpc_error(
                stub.EnrollDevice,
                bootstrap_pb2.EnrollDeviceRequest(
                    csr_pem=csr_for(p256()), enrollment_token=device.token
                ),
                timeout=RPC_TIMEOUT,
            )
            codes.append(error.code())
    assert set(codes) == {grpc.StatusCode.PERMISSION_DENIED}, codes
    assert read_config(config, snapshot) == before, "a re-used token changed the store"
    store: Store = open_store(config, migrate=False)
    try:
        new = list(store.audit_entries())[entries_before:]
    finally:
        store.close()
    assert [(e.action, e.subject, e.detail.get("reason")) for e in new] == [
        ("device.enroll.denied", d.device_id, "token already used") for d in ledger.devices
    ]
    return len(codes)


def test_nothing_acknowledged_is_lost_across_sigkills(tmp_path: Path, store_url: str) -> None:
    """D1, D2, D3 (I8, I12; issue 10 item 7): concurrent sign-ups, app enrollments, device
    enrollments, claims and OpenSession against `broker serve`, SIGKILLed at a random moment under
    load KILLS times and restarted on the same store. After the last restart every acknowledged
    item exists with its certificate and audit entry, every consumed token and claim code is
    still consumed (re-use: PERMISSION_DENIED, nothing written), and `broker audit verify` passes.
    """
    started = time.monotonic()
    seed = int(os.environ.get("BROKER_TEST_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    broker = init_home(tmp_path / "home", store_url)
    ledger = Ledger()
    workers = [Worker(i, ledger, random.Random(rng.random())) for i in range(WORKERS)]
    phases: list[tuple[int, int]] = []
    try:
        for _ in range(KILLS):
            broker.start()
            phases.append(load_until_killed(broker, workers, rng))
        errors = [e for w in workers for e in w.errors]
        assert errors == [], errors
        broker.start()  # the last restart, on the same store
        check_everything_acknowledged_exists(broker.config, ledger)
        retried = check_consumed_tokens_stay_consumed(broker, ledger)
    finally:
        broker.stop()
    entries = audit_verify(broker)

    acked = ledger.total()
    cut = [code for w in workers for code in w.interrupted]
    backend = "postgres" if store_url.startswith("postgresql") else "sqlite"
    elapsed = time.monotonic() - started
    print(
        f"\n[{backend}] seed {seed}: acknowledged {acked} items, all found after {KILLS} kills "
        f"({ledger.summary()}); per phase (acked, in flight at kill) {phases}; "
        f"{len(cut)} RPCs cut by kills ({sorted({c.name for c in cut})}), "
        f"{sum(w.transient for w in workers)} shed/contention refusals; {retried} consumed "
        f"tokens re-used -> PERMISSION_DENIED; audit log OK with {entries} entries; "
        f"{elapsed:.1f}s",
        file=sys.stderr,
    )
    assert all(n > 0 for n, _ in phases), f"a kill landed before any load: {phases}"
    assert sum(in_flight for _, in_flight in phases) > 0, "no kill landed with an RPC in flight"
    assert acked >= KILLS * LOAD_BEFORE_KILL
    assert elapsed < 90, f"durability run took {elapsed:.1f}s"  # a guard against hangs


# -- R1, R2: failure budgets in the store ----------------------------------------------------------


def enroll_request(username: str, password: str) -> bootstrap_pb2.EnrollAppRequest:
    return bootstrap_pb2.EnrollAppRequest(
        username=username, password=password, csr_pem=csr_for(p256()), label="phone"
    )


def assert_only_refusal_counted(broker: RunningBroker, before: dict[str, int]) -> None:
    """Since before (table_counts), only the refused login's count was written: failures rows
    and user.login.throttled audit entries (issue 13), nothing else."""
    after = table_counts(broker)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed <= {"failures", "audit_log"}, f"a refused login wrote {changed}"
    added = after["audit_log"] - before["audit_log"]
    actions = [e.action for e in audit_entries(broker)[before["audit_log"] :]]
    assert len(actions) == added and set(actions) <= {"user.login.throttled"}, actions


def test_login_budget_is_kept_across_restart(tmp_path: Path, store_url: str) -> None:
    """R1, D3, I8 (issue 10 item 6: "after a kill -9 and restart, 10 of 10 new wrong passwords
    were checked again"): login_failures_per_pair wrong passwords for xavier from this address
    make the next login there, with the CORRECT password, RESOURCE_EXHAUSTED; a new broker on the
    same store still refuses it the same way (no fresh budget), writing nothing but the refusal's
    count (issue 13: failures rows, a user.login.throttled entry per window); yvonne, from the
    same address, logs in; after the clean restart `broker audit verify` passes."""
    home = tmp_path / "home"
    first = start_broker(home, store_url=store_url)
    clock = first.clock
    try:
        limit = first.config.login_failures_per_pair
        assert limit < first.config.login_failures_per_user  # the pair budget is what runs out
        assert limit < first.config.login_failures_per_peer
        xavier = create_account(first, "xavier")
        yvonne = create_account(first, "yvonne")
        channel, stub = bootstrap_stub(first)
        with channel:
            for _ in range(limit):
                wrong = rpc_error(stub.EnrollApp, enroll_request("xavier", "wrong password!"))
                assert wrong.code() is grpc.StatusCode.UNAUTHENTICATED
            before = table_counts(first)
            right = rpc_error(stub.EnrollApp, enroll_request("xavier", PASSWORD), timeout=10)
            assert right.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, right.details()
            assert_only_refusal_counted(first, before)
    finally:
        stop_broker(first)
    entries_before_restart = audit_verify(BrokerProcess(home, store_url))

    second = start_broker(home, clock=clock, store_url=store_url)
    try:
        before = table_counts(second)
        assert before["app_instances"] == 0
        channel, stub = bootstrap_stub(second)
        with channel:
            right = rpc_error(stub.EnrollApp, enroll_request("xavier", PASSWORD), timeout=10)
            assert right.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, right.details()
            assert 1 <= retry_delay(right) <= second.config.login_window_seconds
            assert_only_refusal_counted(second, before)
            # Another user from the same address is not affected by xavier's budget.
            other = stub.EnrollApp(enroll_request("yvonne", PASSWORD), timeout=10)
            assert other.user_id == yvonne and other.app_id
            # ... and yvonne's success does not reset xavier's.
            again = rpc_error(stub.EnrollApp, enroll_request("xavier", PASSWORD), timeout=10)
            assert again.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, again.details()
        assert table_counts(second)["app_instances"] == 1
        owners = {
            str(row[0]) for row in uncontracted_rows(second, "SELECT user_id FROM app_instances")
        }
        assert owners == {yvonne} and xavier not in owners
    finally:
        stop_broker(second)
    # D3: the chain the restarted broker extended (yvonne's app enrollment) still verifies.
    entries = audit_verify(BrokerProcess(home, store_url))
    assert entries > entries_before_restart


def test_two_brokers_share_one_claim_budget(tmp_path: Path, store_url: str) -> None:
    """R2, D3 (I8): broker A (in this process) and broker B (`broker serve`, another process) on
    one store. claim_failures_per_device wrong codes for one device, alternating A and B and
    spread over users that each stay under their own budget, are each PERMISSION_DENIED; then the
    RIGHT code is RESOURCE_EXHAUSTED on both brokers: one budget, not one per process. Nothing is
    granted and the claim code stays unused; another device is still claimable through B; the
    audit chain both processes appended to verifies."""
    home = tmp_path / "home"
    a = start_broker(home, store_url=store_url)
    b = BrokerProcess(home, store_url)
    try:
        b.start()
        per_device = a.config.claim_failures_per_device
        per_user = a.config.claim_failures_per_user
        with operator_channel_of(a) as operator:
            cam, code = enroll_camera(a, operator, "cam-shared")
            spare, spare_code = enroll_camera(a, operator, "cam-spare")
        # Each guesser stays strictly under the per-user budget: only the device's runs out.
        guessers = [new_user(a, f"guess{i}") for i in range(math.ceil(per_device / (per_user - 1)))]
        owner = new_user(a, "rightful")
        wrong = "0" * len(code) if code != "0" * len(code) else "1" * len(code)

        def claim(on: str, creds: AppCreds, device_id: str, claim_code: str) -> object:
            target = a.main if on == "A" else b.main
            channel = mtls_channel(
                target, a.pki.ca_pem, key_pem(creds.key), creds.chain_pem.encode()
            )
            with channel:
                return app_pb2_grpc.AppServiceStub(channel).ClaimDevice(
                    app_pb2.ClaimDeviceRequest(device_id=device_id, claim_code=claim_code),
                    timeout=10,
                )

        sides = []
        for i in range(per_device):
            side = "AB"[i % 2]
            sides.append(side)
            error = rpc_error(claim, side, guessers[i % len(guessers)], cam.device_id, wrong)
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED, (i, side, error.details())
            assert error.details() == CLAIM_REFUSED
        assert sides.count("A") > 0 and sides.count("B") > 0
        assert grant_rows(a, cam.device_id) == []

        def used(tx: Transaction, scope: str, key: str) -> int:
            return tx.count_failures(scope, key, 0)[0]

        assert read_store(a, lambda tx: used(tx, "claim.device", cam.device_id)) == per_device
        for guesser in guessers:
            spent = read_store(a, functools.partial(used, scope="claim.user", key=guesser.user_id))
            assert spent < per_user, (guesser.user_id, spent)

        before = table_counts(a)
        for side in ("A", "B"):
            error = rpc_error(claim, side, owner, cam.device_id, code)
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, (side, error.details())
            assert 1 <= retry_delay(error) <= a.config.claim_window_seconds
        assert table_counts(a) == before, "a refused claim wrote something"
        assert grant_rows(a, cam.device_id) == []
        assert claim_code_hash_of(a, cam.device_id) is not None, "the claim code was consumed"

        # The budget is per device: the owner claims another device through B at once.
        claim("B", owner, spare.device_id, spare_code)
        assert grant_rows(a, spare.device_id) == [(owner.user_id, "owner", None)]
        assert claim_code_hash_of(a, spare.device_id) is None
    finally:
        b.stop()
        stop_broker(a)
    assert audit_verify(b) > 0
