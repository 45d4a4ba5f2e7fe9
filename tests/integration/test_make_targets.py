"""The operator's make targets, run as an operator runs them (issue 5, "the make targets themselves
run in a test"): `broker serve` in a subprocess on a temporary BROKER_HOME and free ports, and
`make -C <repo> <target>` in subprocesses against it, with one simulated camera attached.

`-o .venv/.installed` tells make not to (re)build the venv stamp: the targets' own recipes run,
but make never pip-installs during a test (the stamp may be absent in a checkout whose venv was
made another way).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from broker.audit.chain import verify_chain
from broker.client.app import AppClient
from broker.client.device import DeviceClient, Endpoints, TlsHandshakeFailed
from broker.client.simcam import SimulatedCamera
from broker.pemfile import read_certificates
from broker.pki.ca import PkiFiles
from broker.service.effects import STALE_CERTIFICATE
from broker.store import CertStatus
from broker.store.sqlite import SqliteStore
from tests.helpers import PASSWORD, served_certificate

REPO = Path(__file__).resolve().parents[2]
BROKER_BIN = REPO / ".venv" / "bin" / "broker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ops:
    """A broker process on a temporary home, and make run against it."""

    home: Path
    env: dict[str, str]
    addresses: dict[str, str]
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    process: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)

    @property
    def files(self) -> PkiFiles:
        return PkiFiles(self.home / "certs")

    def make(
        self, target: str, *variables: str, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [
                "make",
                "--no-print-directory",
                "-C",
                str(REPO),
                "-o",
                ".venv/.installed",
                target,
                *variables,
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if ok:
            assert result.returncode == 0, (target, result.stdout, result.stderr)
        return result

    def audited(self, action: str, target: str, *variables: str) -> str:
        """Run a target that must succeed and append exactly its own audit entry (I12)."""
        before = self.audit_actions()
        out = self.make(target, *variables).stdout
        after = self.audit_actions()
        assert after[: len(before)] == before, target
        assert action in after[len(before) :], (target, after[len(before) :])
        return out

    def serve(self) -> None:
        self.process = subprocess.Popen(
            [str(BROKER_BIN), "serve"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                if line.startswith("broker serving"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        assert ready.wait(20), "".join(self.output)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: object, timeout: float = 30) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def endpoints(self) -> Endpoints:
        return Endpoints(self.addresses["bootstrap"], self.addresses["main"])

    def audit_actions(self) -> list[str]:
        if not (self.home / "var" / "broker.db").exists():
            return []
        store = SqliteStore(self.home / "var" / "broker.db")
        try:
            return [e.action for e in store.audit_entries()]
        finally:
            store.close()


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Ops]:
    if not BROKER_BIN.exists():
        pytest.skip(f"{BROKER_BIN} missing: run `make venv`")
    addresses = {name: f"127.0.0.1:{free_port()}" for name in ("bootstrap", "main", "factory")}
    env = {
        **os.environ,
        "BROKER_HOME": str(tmp_path),
        "BROKER_BOOTSTRAP_ADDRESS": addresses["bootstrap"],
        "BROKER_MAIN_ADDRESS": addresses["main"],
        "BROKER_FACTORY_ADDRESS": addresses["factory"],
    }
    for variable in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS"):
        env.pop(variable, None)
    running = Ops(tmp_path, env, addresses)
    try:
        yield running
    finally:
        running.stop()


def detail(output: str, key: str) -> str:
    match = re.search(rf"^  {re.escape(key)}: (.+)$", output, re.MULTILINE)
    assert match, (key, output)
    return match.group(1)


RELOADED = re.compile(
    r"^broker reloaded: trust bundle (\w+) \((changed|unchanged)\), pushed to (\d+) attached "
    r"camera\(s\); issuing CA serial (\w+)$",
    re.MULTILINE,
)


def reloaded(output: str) -> tuple[str, str, int, str]:
    match = RELOADED.search(output)
    assert match, output
    return match.group(1), match.group(2), int(match.group(3)), match.group(4)


def test_every_ops_target_against_a_live_broker(ops: Ops) -> None:
    started = time.monotonic()
    files = ops.files

    # make certs: the dev PKI, idempotent.
    out = ops.audited("certificate.issued", "certs")
    assert "dev PKI ready" in out and files.ca_bundle.exists()
    assert "nothing replaced" in ops.make("certs").stdout
    ops.serve()

    # make enroll-token: the token alone on the last line; a camera enrolls with it and attaches.
    out = ops.audited("enrollment_token.created", "enroll-token", "DEVICE=cam-mk1")
    *_, token = out.strip().splitlines()
    assert re.fullmatch(r"bet_[A-Za-z0-9_-]+", token), out
    camera_client = DeviceClient(
        ops.home / "cam-mk1", ops.endpoints(), files.ca_bundle.read_bytes()
    )
    state = ops.run(camera_client.enroll(token))
    assert state.device_id == "cam-mk1"
    camera = SimulatedCamera(camera_client, heartbeat_interval=0.2)
    camera_task = asyncio.run_coroutine_threadsafe(camera.run(), ops.loop)
    deadline = time.monotonic() + 10
    while not camera.attached.is_set():
        assert time.monotonic() < deadline and not camera_task.done(), camera.ended
        time.sleep(0.02)
    assert ops.make("enroll-token", ok=False).returncode == 2  # DEVICE= is required

    # make revoke-device: a second camera, revoked via the running broker.
    *_, token2 = ops.make("enroll-token", "DEVICE=cam-mk2").stdout.strip().splitlines()
    doomed = DeviceClient(ops.home / "cam-mk2", ops.endpoints(), files.ca_bundle.read_bytes())
    ops.run(doomed.enroll(token2))
    doomed_serial = f"{read_certificates(doomed.chain_path)[0].serial_number:x}"
    out = ops.audited("device.revoked", "revoke-device", "DEVICE=cam-mk2", "REASON=key compromise")
    assert (
        f"revoked device cam-mk2: 1 certificate(s) {doomed_serial}; 0 live stream(s) closed" in out
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        ops.run(doomed.renew())
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED

    # make revoke-app: an app instance (a lost phone).
    app = AppClient(ops.home / "app", ops.endpoints(), files.ca_bundle.read_bytes())
    ops.run(app.create_account("ivy", PASSWORD))
    app_state = ops.run(app.enroll("ivy", PASSWORD, "phone"))
    app_serial = f"{read_certificates(app.chain_path)[0].serial_number:x}"
    out = ops.audited("app.revoked", "revoke-app", f"APP={app_state.app_id}")
    assert (
        f"revoked app instance {app_state.app_id} of user {app_state.user_id}; 0 session(s) ended"
        in out
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        ops.run(app.list_devices())
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED

    # make fleet-audit: the revoked camera and app instance that called again are reported
    # (read-only: no audit entry of its own).
    entries_before = len(ops.audit_actions())
    out = ops.make("fleet-audit").stdout
    assert "revoked identities still connecting: 2\n" in out, out
    assert f"  device cam-mk2: 1 refused call(s) with revoked certificate {doomed_serial}" in out
    assert (
        f"  app {app_state.app_id}: 1 refused call(s) with revoked certificate {app_serial}" in out
    )
    fleet = json.loads(ops.make("fleet-audit", "JSON=1", "SINCE=3600").stdout)
    assert fleet["thresholds"]["since_seconds"] == 3600
    assert [(f["kind"], f["id"], f["count"]) for f in fleet["revoked_attempts"]] == [
        ("app", app_state.app_id, 1),
        ("device", "cam-mk2", 1),
    ]
    assert len(ops.audit_actions()) == entries_before

    # make crl: certs/crl.pem, signed by the issuing CA, listing both revoked certificates.
    out = ops.audited("pki.crl_published", "crl")
    assert "1 CRL(s), 2 revoked certificate(s) not yet expired" in out
    crl = x509.load_pem_x509_crl((files.root / "crl.pem").read_bytes())
    assert crl.is_signature_valid(read_certificates(files.issuing_cert)[0].public_key())
    assert {f"{r.serial_number:x}" for r in crl} == {doomed_serial, app_serial}

    # make rotate-server-cert: served at once, nothing pushed (the bundle did not change).
    out = ops.audited("pki.server_cert_rotated", "rotate-server-cert")
    serial = detail(out, "serial")
    version, changed, pushed, _ = reloaded(out)
    assert (changed, pushed) == ("unchanged", 0)
    served = served_certificate(ops.addresses["bootstrap"], files.ca_bundle.read_bytes())
    assert f"{served.serial_number:x}" == serial
    assert "next: new connections use the new certificate" in out

    # make rotate-intermediate: new issuing CA, bundle pushed to the attached camera.
    out = ops.audited("pki.intermediate_rotated", "rotate-intermediate")
    new_issuing = detail(out, "new_issuing_serial")
    version, changed, pushed, issuing_serial = reloaded(out)
    assert (changed, pushed, issuing_serial) == ("changed", 1, new_issuing)
    assert f"{read_certificates(files.issuing_cert)[0].serial_number:x}" == new_issuing

    # make rotate-token-key.
    out = ops.audited("pki.token_key_rotated", "rotate-token-key")
    new_kid = detail(out, "new_kid")
    assert json.loads((files.root / "token-keys" / "keys.json").read_text())["active"] == new_kid
    assert reloaded(out)[1:3] == ("changed", 1)

    # make rotate-root, then rotation-status until the camera acknowledged the new bundle.
    out = ops.audited("pki.root_rotated", "rotate-root")
    assert "pki.root_rotated:" in out and "next: cameras receive the new bundle" in out
    version, changed, pushed, _ = reloaded(out)
    assert (changed, pushed) == ("changed", 1)
    status = ""
    deadline = time.monotonic() + 10
    while "holding current bundle    1 (1 online)" not in status:
        assert time.monotonic() < deadline, status
        status = ops.make("rotation-status").stdout
    assert f"trust bundle version      {version}" in status
    assert "root rotation pending     yes" in status
    assert "active cameras            1 (1 online)" in status  # cam-mk2 is revoked
    assert "lagging" not in status

    # make retire-root: refused while the camera still holds a certificate under the old root.
    # Read-only (rotation-status) and refused (retire-root) runs leave no audit entry.
    entries_before = len(ops.audit_actions())
    ops.make("rotation-status")
    result = ops.make("retire-root", ok=False)
    assert result.returncode == 2, result
    assert (
        "error: 0 active camera(s) lack the current trust bundle (-) and 1 still hold a "
        "certificate under the old root (cam-mk1); wait for them to attach and renew, or force "
        "with FORCE=1"
    ) in result.stderr
    assert (files.root / "root-cross.pem").exists()
    assert len(ops.audit_actions()) == entries_before

    # FORCE=1 retires anyway and says who is cut off.
    out = ops.audited("pki.root_retired", "retire-root", "FORCE=1")
    assert detail(out, "forced") == "True"
    assert detail(out, "old_chain_certs") == "['cam-mk1']"
    # The camera's stream runs on a certificate under the retired root: the reload ends it (it
    # could only offer viewers a chain the apps no longer trust) instead of pushing to it.
    assert reloaded(out)[1:3] == ("changed", 0)
    assert not (files.root / "root-cross.pem").exists()
    assert "next: cameras holding only the old root can no longer connect" in out
    camera_task.result(timeout=10)
    assert camera.ended is not None and camera.ended.code() is grpc.StatusCode.UNAVAILABLE
    assert camera.ended.details() == STALE_CERTIFICATE
    # Reconnecting, its handshake is refused; the SDK fetches the broker's current bundle (which
    # no longer holds the old root) and says what to do.
    with pytest.raises(TlsHandshakeFailed) as cut_off:
        ops.run(camera_client.renew())
    assert cut_off.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "re-enroll" in cut_off.value.reason
    assert camera_client.bundle_path.read_bytes() == files.ca_bundle.read_bytes()

    # make audit-verify: the chain is intact, and every action above left its entry.
    out = ops.make("audit-verify").stdout
    assert re.search(r"^audit log OK: \d+ entries, head \w+$", out, re.MULTILINE), out
    assert ops.audit_actions().count("pki.root_retired") == 1
    store = SqliteStore(ops.home / "var" / "broker.db")
    try:
        assert verify_chain(store.audit_entries()).ok
        with store.read() as tx:
            statuses = {
                r.status for r in tx.certificates_of("spiffe://camera.local/device/cam-mk2")
            }
    finally:
        store.close()
    assert statuses == {CertStatus.REVOKED}

    # I11: the broker process's own output (stdout and stderr) shows no secret it handled, and
    # its refusal lines carry a request id.
    served = "".join(ops.output)
    for secret in (token, token2, PASSWORD, state.claim_code):
        assert secret not in served
    assert any("rpc refused" in line and " request_id=" in line for line in ops.output), served

    camera_task.cancel()
    elapsed = time.monotonic() - started
    assert elapsed < 40, f"make targets took {elapsed:.1f}s"
    print(f"make targets: {elapsed:.1f}s", file=sys.stderr)
