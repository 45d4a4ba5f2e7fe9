"""Issue 13's login scenario against a real broker (default login limits, cheap argon2), over
TLS: an attacker guesses from one address, a bystander logs in from the same address, a burst of
concurrent guesses is paced, and the audit log accounts for every refused attempt.

    .venv/bin/python -m tools.login_limits_demo
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path

import grpc

from broker._proto.broker.v1 import bootstrap_pb2
from broker.audit.chain import verify_chain
from tests.conftest import start_broker, stop_broker
from tests.helpers import PASSWORD, audit_entries, bootstrap_stub, create_account, csr_for, p256


def req(username: str, password: str) -> bootstrap_pb2.EnrollAppRequest:
    return bootstrap_pb2.EnrollAppRequest(
        username=username, password=password, csr_pem=csr_for(p256()), label="phone"
    )


def main() -> None:
    home = Path(tempfile.mkdtemp())
    b = start_broker(home)
    try:
        create_account(b, "xavier")
        create_account(b, "yvonne")
        ch, stub = bootstrap_stub(b)
        codes = collections.Counter()
        t0 = time.monotonic()
        with ch:
            for i in range(30):
                u = "xavier" if i < 10 else f"random{i:03d}"
                try:
                    stub.EnrollApp(req(u, "wrong password!"), timeout=30)
                except grpc.RpcError as e:
                    codes[e.code().name] += 1
                b.clock.advance(1.0)  # an attacker guessing once a second
            print(
                f"30 sequential wrong passwords from 127.0.0.1: {dict(codes)} in {time.monotonic() - t0:.1f} s"
            )
            t = time.monotonic()
            r = stub.EnrollApp(req("yvonne", PASSWORD), timeout=30)
            print(
                f"yvonne (never attacked) from 127.0.0.1: OK app_id={r.app_id} in {time.monotonic() - t:.2f} s"
            )
            try:
                stub.EnrollApp(req("xavier", PASSWORD), timeout=30)
            except grpc.RpcError as e:
                print(f"xavier, right password, same address: {e.code().name} {e.details()!r}")
            t = time.monotonic()
            futures = [
                stub.EnrollApp.future(req(f"burst{i:03d}", "wrong password!"), timeout=60)
                for i in range(50)
            ]
            burst = collections.Counter(f.exception().code().name for f in futures)
            print(
                f"50 concurrent wrong guesses from 127.0.0.1: {dict(burst)} in {time.monotonic() - t:.1f} s"
            )
            b.clock.advance(61)
            stub.EnrollApp(req("yvonne", PASSWORD), timeout=30)
        entries = audit_entries(b)
        denied = [e for e in entries if e.action == "user.login.denied"]
        thr = [e for e in entries if e.action == "user.login.throttled"]
        print(
            f"audit: {len(denied)} user.login.denied, {len(thr)} user.login.throttled entries "
            f"counting {sum(e.detail['count'] for e in thr)} refused attempts; chain ok={verify_chain(entries).ok}"
        )
        for e in thr:
            print("  ", e.subject, dict(e.detail))
    finally:
        stop_broker(b)


if __name__ == "__main__":
    main()
