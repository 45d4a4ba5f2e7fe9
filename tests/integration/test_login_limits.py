"""Login limits an attacker cannot turn against bystanders (issue 13 item 2), over the real
bootstrap listener (TLS, EnrollApp). Every caller here is 127.0.0.1, which is the point: one
shared address (a carrier NAT, an office). Limits per explicit address (per username across
addresses, trusted pairs) are in tests/unit/test_login_limits.py.

Scheme: hard budget per (address, username); hard budget per username except where it logged in
before; per address a slowdown (store-reserved slots), refused only when the next slot is further
than login_slow_max_wait_seconds. Refused attempts are summarized in the audit log per window.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from broker._proto.broker.v1 import bootstrap_pb2
from broker.audit.chain import AuditEntry, verify_chain
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    PASSWORD,
    RunningBroker,
    audit_entries,
    bootstrap_stub,
    count_rows,
    create_account,
    csr_for,
    p256,
    retry_delay,
    rpc_error,
)
from tests.pg import fresh_database, integration_backend

WRONG = "not the password at all"
LIMITS: dict[str, object] = {
    "login_failures_per_pair": 3,
    "login_failures_per_user": 6,
    "login_failures_per_peer": 8,
    "login_slow_delay_seconds": 0.1,
    "login_slow_max_delay_seconds": 0.4,
    "login_slow_max_wait_seconds": 1.5,
}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker with small login limits, on the suite's backend."""
    with ExitStack() as stack:
        store_url = ""
        if integration_backend() == "postgres":
            store_url = stack.enter_context(fresh_database())
        running = start_broker(tmp_path, None, store_url=store_url, **LIMITS)
        try:
            yield running
        finally:
            stop_broker(running)


def request(username: str, password: str) -> bootstrap_pb2.EnrollAppRequest:
    return bootstrap_pb2.EnrollAppRequest(
        username=username, password=password, csr_pem=csr_for(p256()), label="phone"
    )


def issued(broker: RunningBroker) -> tuple[int, int]:
    """(app instances, app certificates) in the store."""
    return count_rows(broker, "app_instances"), count_rows(broker, "certificates", kind="app")


def throttled_total(entries: list[AuditEntry]) -> int:
    return sum(int(e.detail["count"]) for e in entries if e.action == "user.login.throttled")


def test_i8_bystander_logs_in_from_an_attacked_address(broker: RunningBroker) -> None:
    """I8 (issue 13 item 2, the reported scenario): from one address, wrong passwords for xavier
    until his pair is refused, then 25 wrong passwords for random usernames (an attacker
    guessing about every 0.2 s); yvonne, never attacked and never logged in there, then logs in
    from the same address with her password: not refused, in less than the maximum slot wait
    (+ generous slack for a loaded machine). Before, she was RESOURCE_EXHAUSTED for 5 minutes.
    xavier's right password stays RESOURCE_EXHAUSTED and nothing was issued to him."""
    create_account(broker, "xavier")
    yvonne = create_account(broker, "yvonne")
    channel, stub = bootstrap_stub(broker)
    with channel:
        for _ in range(broker.config.login_failures_per_pair):
            wrong = rpc_error(stub.EnrollApp, request("xavier", WRONG), timeout=30)
            assert wrong.code() is grpc.StatusCode.UNAUTHENTICATED
        for i in range(25):
            wrong = rpc_error(stub.EnrollApp, request(f"random{i:03d}", WRONG), timeout=30)
            assert wrong.code() is grpc.StatusCode.UNAUTHENTICATED, wrong.details()
            broker.clock.advance(0.2)
        refused = rpc_error(stub.EnrollApp, request("xavier", PASSWORD), timeout=30)
        assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 1 <= retry_delay(refused) <= broker.config.login_window_seconds
        assert issued(broker) == (0, 0)
        started = time.monotonic()
        response = stub.EnrollApp(request("yvonne", PASSWORD), timeout=30)
        elapsed = time.monotonic() - started
    assert response.user_id == yvonne and response.app_id
    assert elapsed < broker.config.login_slow_max_wait_seconds + 3.0, elapsed
    assert issued(broker) == (1, 1)
    denied = audit_entries(broker, "user.login.denied")
    assert len(denied) == broker.config.login_failures_per_pair + 25
    assert all(e.detail["peer"] == "127.0.0.1" for e in denied)


def test_i8_concurrent_guesses_from_one_address_are_paced(broker: RunningBroker) -> None:
    """I8: 50 concurrent wrong guesses from one address (distinct usernames, so only the address
    limit applies): at most login_failures_per_peer run at once, the rest take reserved slots
    spaced at least login_slow_delay_seconds apart up to the maximum wait, and the others are
    RESOURCE_EXHAUSTED with RetryInfo. The number verified (= user.login.denied entries) is
    bounded, the run takes at least the last slot's wait, and nothing is issued."""
    channel, stub = bootstrap_stub(broker)
    started = time.monotonic()
    with channel:
        calls = [
            stub.EnrollApp.future(request(f"burst{i:03d}", WRONG), timeout=60) for i in range(50)
        ]
        codes = []
        for call in calls:
            error = call.exception()
            assert isinstance(error, grpc.RpcError)
            codes.append(error.code())
            if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert 1 <= retry_delay(error) <= 60
    elapsed = time.monotonic() - started
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    verified = codes.count(grpc.StatusCode.UNAUTHENTICATED)
    assert verified == len(audit_entries(broker, "user.login.denied"))
    budget = broker.config.login_failures_per_peer
    spacing = broker.config.login_slow_delay_seconds
    max_wait = broker.config.login_slow_max_wait_seconds
    assert budget < verified <= budget + 1 + round(max_wait / spacing), codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 50 - (budget + 1 + 15)
    # the slotted ones waited in turn: the last of them no sooner than its slot
    slotted = verified - budget
    assert elapsed >= (slotted - 1) * spacing, (elapsed, slotted)
    assert issued(broker) == (0, 0)


def test_i12_throttled_attempts_are_summarized_in_the_audit_log(broker: RunningBroker) -> None:
    """I12: 60 failed or refused logins (10 for xavier: pair budget; 50 at once for random
    usernames: address slots) leave one user.login.denied per verified attempt and far fewer
    user.login.throttled entries than refusals; once the window is over (the next login
    summarizes it) the counts add up to every refused attempt and the hash chain verifies."""
    create_account(broker, "xavier")
    yvonne = create_account(broker, "yvonne")
    channel, stub = bootstrap_stub(broker)
    with channel:
        codes = [
            rpc_error(stub.EnrollApp, request("xavier", WRONG), timeout=30).code()
            for _ in range(10)
        ]
        calls = [
            stub.EnrollApp.future(request(f"spray{i:03d}", WRONG), timeout=60) for i in range(50)
        ]
        for call in calls:
            error = call.exception()
            assert isinstance(error, grpc.RpcError)
            codes.append(error.code())
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        denied = codes.count(grpc.StatusCode.UNAUTHENTICATED)
        assert refused + denied == 60 and refused >= 7
        throttled = audit_entries(broker, "user.login.throttled")
        assert 1 <= len(throttled) < refused / 2, [e.detail for e in throttled]
        assert {e.detail["limit"] for e in throttled} >= {"login.pair"}
        broker.clock.advance(broker.config.login_audit_window_seconds + 1)
        # any login after the window summarizes it (here yvonne's own, which succeeds)
        assert stub.EnrollApp(request("yvonne", PASSWORD), timeout=30).user_id == yvonne
    entries = audit_entries(broker)
    assert len([e for e in entries if e.action == "user.login.denied"]) == denied
    assert throttled_total(entries) == refused
    assert verify_chain(entries).ok
    assert issued(broker) == (1, 1)
