"""Provisioning, before any timing: a bench home with a fresh dev PKI; enrollment tokens and CSRs;
cameras, owners and viewers made with the core authorities on the broker's database before the
broker starts, each written as the SDK's own identity directory (so the benchmarks drive the
unmodified DeviceClient / AppClient); and the store checks that end a benchmark, read through the
store contract (read transactions, audit entries), never through SQL.

Setup writes go in store.batch() blocks (one COMMIT per block on SQLite; PostgreSQL commits each
transaction on its own), not a weaker synchronous mode. The store is the one the config names
(``broker.store.open.open_store``): a SQLite file or a PostgreSQL URL."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.harness.broker import bench_config
from broker.config import Config

# argon2 with cheap parameters only so that setup is quick; no measured RPC hashes a password.
CHEAP_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 8192, "argon2_parallelism": 1}
PASSWORD = "bench-password-long-enough-0123"
Item = tuple[str, str, str]  # (device_id, enrollment token, CSR PEM)
CHUNK = 500  # setup calls per COMMIT


@contextlib.contextmanager
def bench_home(name: str, keep: bool, **overrides: Any) -> Iterator[Config]:
    """A temporary home with a fresh dev PKI; deleted afterwards unless keep."""
    from broker.clock import SystemClock
    from broker.pki.ca import init_pki

    home = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    try:
        config = bench_config(home, **overrides)
        init_pki(config, SystemClock())
        yield config
    finally:
        if keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def open_store(config: Config, migrate: bool = True) -> Any:
    """The store config names (SQLite file or PostgreSQL URL), through the store contract."""
    from broker.store.open import open_store as open_configured

    return open_configured(config, migrate=migrate)


class Core:
    """The core authorities over one store connection (setup and in-process measurements)."""

    def __init__(self, config: Config, issuer: Any = None) -> None:
        from broker.accounts.passwords import PasswordHasher
        from broker.accounts.users import Accounts
        from broker.clock import SystemClock
        from broker.devices.enrollment import DeviceAuthority
        from broker.devices.ownership import Ownership
        from broker.identity.spiffe import operator
        from broker.pki.ca import load_authority

        self.config = config
        self.clock = SystemClock()
        self.store = open_store(config)
        self.ca = load_authority(config, self.clock)
        self.devices = DeviceAuthority(config, issuer or self.ca, self.store, self.clock)
        self.accounts = Accounts(config, self.ca, self.store, self.clock, PasswordHasher(config))
        self.ownership = Ownership(config, self.store, self.clock)
        self.actor = operator(config.trust_domain, "bench")

    def tokens(self, device_ids: list[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(device_ids), CHUNK):
            with self.store.batch():
                out += [
                    self.devices.create_enrollment_token(self.actor, d).token
                    for d in device_ids[start : start + CHUNK]
                ]
        return out

    def close(self) -> None:
        self.store.close()


def make_items(config: Config, prefix: str, count: int) -> list[Item]:
    """Enrollment tokens in the store and one fresh key's CSR each."""
    from broker.client.device import make_csr
    from broker.pki.ca import new_key

    core = Core(config)
    try:
        ids = [f"{prefix}-{i:06d}" for i in range(count)]
        return [(d, t, make_csr(new_key())) for d, t in zip(ids, core.tokens(ids), strict=True)]
    finally:
        core.close()


# ---------------------------------------------------------------------------------------------
# identities in the SDK's own directory layout
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Camera:
    device_id: str
    dir: Path


@dataclasses.dataclass(frozen=True)
class App:
    username: str
    user_id: str
    app_id: str
    dir: Path
    device_id: str = ""  # the camera it owns and watches (owners)

    @property
    def key_pem(self) -> bytes:
        return (self.dir / "app.key").read_bytes()

    @property
    def chain_pem(self) -> bytes:
        return (self.dir / "app.pem").read_bytes()


@dataclasses.dataclass(frozen=True)
class Provisioned:
    cameras: list[Camera]
    owners: list[App]
    viewers: list[App]
    ca_pem: bytes
    jwks_json: str
    issuer: str
    trust_domain: str


def _write_identity(sdk_dir: Any, key: Any, chain_pem: str, state: Any, bundle: str) -> None:
    """What the SDK writes at enrollment, without its per-file fsync (thousands of cameras)."""
    from broker.pemfile import private_key_pem

    sdk_dir.key_path.write_bytes(private_key_pem(key))
    sdk_dir.key_path.chmod(0o600)
    sdk_dir.chain_path.write_text(chain_pem)
    sdk_dir.trust_path.write_text(bundle)
    sdk_dir.state_path.write_text(json.dumps(dataclasses.asdict(state)))


def provision(
    config: Config,
    cameras: int,
    owners: int,
    viewers: int = 0,
    apps_per_viewer: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Provisioned:
    """Cameras (one-time token, key made "on the device"); owner i claims camera i with its claim
    code. With viewers: owner 0 also claims every other camera and shares each camera it owns
    with every viewer, who each hold apps_per_viewer app instances."""
    from broker.client.app import AppClient, AppState
    from broker.client.bundle import StoredBundle
    from broker.client.device import DeviceClient, DeviceState, Endpoints, make_csr
    from broker.clock import unix
    from broker.pki.ca import new_key
    from broker.pki.trust import load_trust_bundle
    from broker.protocol.tokens import load_keyring

    nowhere = Endpoints("", "")
    ca_pem = (config.certs_dir / "ca-bundle.pem").read_bytes()
    jwks = load_keyring(config.certs_dir).jwks_json()
    trust = load_trust_bundle(config, jwks)
    bundle = json.dumps(
        dataclasses.asdict(
            StoredBundle(
                trust.ca_certificates_pem,
                trust.issuing_certificates_pem,
                trust.jwks_json,
                trust.version,
            )
        )
    )
    root = config.home / "clients"
    core = Core(config)
    try:
        width = max(3, len(str(cameras - 1)))
        ids = [f"cam-{i:0{width}d}" for i in range(cameras)]
        tokens = core.tokens(ids)
        cams: list[Camera] = []
        codes: dict[str, str] = {}
        for start in range(0, cameras, CHUNK):
            with core.store.batch():
                for device_id, token in zip(
                    ids[start : start + CHUNK], tokens[start : start + CHUNK], strict=True
                ):
                    key = new_key()
                    enrolled = core.devices.enroll_with_token(make_csr(key), token)
                    codes[device_id] = enrolled.claim_code
                    sdk = DeviceClient(root / device_id, nowhere, ca_pem)
                    issued = enrolled.issued
                    _write_identity(
                        sdk,
                        key,
                        issued.chain_pem,
                        DeviceState(
                            device_id,
                            enrolled.identity.spiffe_id,
                            unix(issued.not_after),
                            unix(issued.renew_after),
                            trust.version,
                            enrolled.claim_code,
                        ),
                        bundle,
                    )
                    cams.append(Camera(device_id, sdk.dir))
            if progress and (start + CHUNK) % 2000 == 0:
                progress(f"{start + CHUNK} cameras enrolled")

        def app(username: str, label: str, device_id: str = "") -> tuple[App, Any]:
            with core.store.read() as tx:
                user = tx.get_user_by_username(username)
            assert user is not None
            key = new_key()
            identity = core.accounts.new_app_identity(user.user_id)
            prepared = core.accounts.prepare_app_certificate(identity, make_csr(key))
            made = core.accounts.issue_app_certificate(user, prepared, label)
            sdk = AppClient(root / f"{username}-{made.identity.app_id}", nowhere, ca_pem)
            _write_identity(
                sdk,
                key,
                made.issued.chain_pem,
                AppState(
                    user.user_id,
                    made.identity.app_id,
                    made.identity.spiffe_id,
                    unix(made.issued.not_after),
                    unix(made.issued.renew_after),
                ),
                bundle,
            )
            return App(
                username, user.user_id, made.identity.app_id, sdk.dir, device_id
            ), made.identity

        owner_apps: list[App] = []
        owner_identities = []
        for start in range(0, owners, CHUNK):
            with core.store.batch():
                for i in range(start, min(owners, start + CHUNK)):
                    username = f"owner{i:0{width}d}"
                    core.accounts.create_account(username, PASSWORD)
                    owner, identity = app(username, "bench phone", ids[i])
                    owned = ids if viewers and i == 0 else [ids[i]]
                    for device_id in owned:
                        core.ownership.claim(identity, device_id, codes[device_id])
                    owner_apps.append(owner)
                    owner_identities.append(identity)
        viewer_apps: list[App] = []
        for u in range(viewers):
            username = f"viewer{u:04d}"
            with core.store.batch():
                core.accounts.create_account(username, PASSWORD)
                viewer_apps += [
                    app(username, f"{username} phone")[0] for _ in range(apps_per_viewer)
                ]
                for device_id in ids:
                    core.ownership.share(owner_identities[0], device_id, username, 0)
        # Interleave users so consecutive calls (and each client process's share) mix users.
        viewer_apps = [
            viewer_apps[u * apps_per_viewer + a]
            for a in range(apps_per_viewer)
            for u in range(viewers)
        ]
        return Provisioned(
            cams,
            owner_apps,
            viewer_apps,
            ca_pem,
            jwks,
            config.broker_spiffe_id,
            config.trust_domain,
        )
    finally:
        core.close()


# ---------------------------------------------------------------------------------------------
# store checks, through the store contract
# ---------------------------------------------------------------------------------------------
def check_line(what: str, value: int, want: int, problems: list[str], width: int = 34) -> None:
    status = "ok" if value == want else "MISMATCH"
    print(f"  {what:<{width}}{value:>9,}  (expected {want:,})  {status}")
    if value != want:
        problems.append(f"{what}: {value} != {want}")


def audit_check(
    config: Config, problems: list[str], expect: dict[str, int] | None = None
) -> Counter[str]:
    """Verifies the audit hash chain and the expected entry counts by action; returns the
    entries counted by action."""
    from broker.audit.chain import verify_chain

    store = open_store(config, migrate=False)
    try:
        entries = list(store.audit_entries())
    finally:
        store.close()
    result = verify_chain(iter(entries))
    print(f"  {'audit hash chain':<34}{result.entries:>9,}  {'ok' if result.ok else 'BROKEN'}")
    if not result.ok:
        problems.append(f"audit chain broken at {result.first_bad_seq}: {result.reason}")
    actions = Counter(e.action for e in entries)
    for action, want in (expect or {}).items():
        check_line(f"{action} audit entries", actions[action], want, problems)
    return actions


def read_store(config: Config, fn: Callable[[Any], Any]) -> Any:
    """fn(tx) in one read transaction of the store contract."""
    store = open_store(config, migrate=False)
    try:
        with store.read() as tx:
            return fn(tx)
    finally:
        store.close()


def elapsed(started: float) -> str:
    return f"{time.monotonic() - started:.1f} s"
