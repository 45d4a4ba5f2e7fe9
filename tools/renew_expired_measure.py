"""Renewal after expiry against a real broker: 100 cameras whose certificates expired 40 days ago
renew one after another over one TLS connection (latency), then 50 of the same requests are
replayed (each must be refused).

    .venv/bin/python -m tools.renew_expired_measure
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from broker.client.identity_dir import expired_renewal_request
from broker.clock import FakeClock
from tests.conftest import start_broker, stop_broker
from tests.helpers import bootstrap_stub, csr_for, enroll_device, operator_channel_of, p256


def main() -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC) - dt.timedelta(days=40))
    broker = start_broker(Path(tempfile.mkdtemp()), clock)
    try:
        with operator_channel_of(broker) as operator:
            cameras = [enroll_device(broker, operator, f"cam-{i:03d}") for i in range(100)]
        clock.advance(40 * 86400)
        now = int(clock.now().timestamp())
        requests = [
            expired_renewal_request(c.key, c.chain_pem.encode(), csr_for(p256()), now)
            for c in cameras
        ]
        channel, stub = bootstrap_stub(broker)
        with channel:
            times = []
            for request in requests:
                started = time.perf_counter()
                stub.RenewExpiredCertificate(request, timeout=30)
                times.append(time.perf_counter() - started)
            started = time.perf_counter()
            refused = 0
            for request in requests[:50]:
                try:
                    stub.RenewExpiredCertificate(request, timeout=30)
                except grpc.RpcError as error:
                    refused += error.code() is grpc.StatusCode.PERMISSION_DENIED
            replay = (time.perf_counter() - started) / 50
        times.sort()
        print(
            f"100 sequential renewals after expiry: p50 {statistics.median(times) * 1e3:.1f} ms, "
            f"p95 {times[94] * 1e3:.1f} ms, max {times[-1] * 1e3:.1f} ms; "
            f"{refused} of 50 replays refused PERMISSION_DENIED, {replay * 1e3:.1f} ms each"
        )
    finally:
        stop_broker(broker)


if __name__ == "__main__":
    main()
