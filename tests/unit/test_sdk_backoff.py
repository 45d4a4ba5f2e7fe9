"""The camera SDK's reconnect loop: full-jitter bounds, reset after a stable attach, the broker's
RetryInfo pushback as a floor, and stopping when the broker refuses the camera; plus the address
lists the SDK turns into one gRPC target. A fake sleep records delays instead of waiting."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from broker.client.channels import split_addresses, target_for
from broker.client.device import Endpoints
from broker.client.reconnect import (
    BASE_DELAY,
    MAX_DELAY,
    AttachEnd,
    Backoff,
    Reconnector,
    judge,
    retry_pushback,
)
from broker.errors import ResourceExhausted
from broker.service.status import status_for, trailing_details


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body on a fresh event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


def rpc_error(
    code: grpc.StatusCode, details: str = "", trailing: tuple[tuple[str, bytes], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details
    )


def retry_info(seconds: int, nanos: int = 0) -> tuple[tuple[str, bytes], ...]:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos))
    )
    status = status_pb2.Status(code=8, message="slow down", details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def scripted(ends: list[AttachEnd], stop: asyncio.Event) -> tuple[list[int], object]:
    """attach_once returning the given ends in order, then setting stop."""
    calls = [0]

    async def attach_once() -> AttachEnd:
        calls[0] += 1
        if not ends:
            stop.set()
            await asyncio.sleep(3600)
        return ends.pop(0)

    return calls, attach_once


UNAVAILABLE = AttachEnd(rpc_error(grpc.StatusCode.UNAVAILABLE, "broker draining: reconnect"), 0.1)


# -- backoff bounds ----------------------------------------------------------------------------
def test_full_jitter_bounds_double_up_to_the_cap() -> None:
    backoff = Backoff(rng=random.Random(7))
    for n in range(20):
        ceiling = min(MAX_DELAY, BASE_DELAY * 2**n)
        assert backoff.ceiling() == ceiling
        delay = backoff.next_delay()
        assert 0 <= delay <= ceiling
    assert backoff.ceiling() == MAX_DELAY


def test_full_jitter_spreads_over_the_whole_window() -> None:
    """Full jitter: delays cover [0, ceiling], not a band near the ceiling (no storm)."""
    rng = random.Random(1)
    delays = []
    for _ in range(2000):
        backoff = Backoff(rng=rng)
        backoff.attempt = 6  # ceiling 30 s (0.5 * 64 > 30)
        delays.append(backoff.next_delay())
    assert min(delays) < 1.0 and max(delays) > 29.0
    assert 13.0 < sum(delays) / len(delays) < 17.0  # uniform: mean about 15 s


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(base=2, cap=1)


# -- the loop ----------------------------------------------------------------------------------
@run_async
async def test_reconnect_delays_grow_within_full_jitter_bounds() -> None:
    stop = asyncio.Event()
    sleep = FakeSleep()
    calls, attach_once = scripted([UNAVAILABLE] * 8, stop)
    reconnector = Reconnector(Backoff(rng=random.Random(3)), sleep=sleep)
    result = await reconnector.run(attach_once, stop)  # type: ignore[arg-type]
    assert result.reason == "stopped"
    assert calls[0] == 9 and reconnector.stats.attaches == 9
    assert sleep.delays == reconnector.stats.delays and len(sleep.delays) == 8
    for n, delay in enumerate(sleep.delays):
        assert 0 <= delay <= min(MAX_DELAY, BASE_DELAY * 2**n)


@run_async
async def test_a_stable_attach_resets_the_backoff() -> None:
    stop = asyncio.Event()
    sleep = FakeSleep()
    stable = AttachEnd(UNAVAILABLE.error, 60.0)
    _calls, attach_once = scripted([UNAVAILABLE] * 5 + [stable], stop)
    reconnector = Reconnector(Backoff(rng=random.Random(5)), sleep=sleep, stable_after=10.0)
    await reconnector.run(attach_once, stop)  # type: ignore[arg-type]
    assert reconnector.stats.stable_attaches == 1
    assert reconnector.backoff.attempt == 1  # reset, then one delay drawn
    assert sleep.delays[-1] <= BASE_DELAY


@run_async
async def test_pushback_is_a_floor_on_the_delay() -> None:
    stop = asyncio.Event()
    sleep = FakeSleep()
    pushed = AttachEnd(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_info(7)), None)
    _calls, attach_once = scripted([pushed] * 3, stop)
    reconnector = Reconnector(Backoff(rng=random.Random(9)), sleep=sleep)
    await reconnector.run(attach_once, stop)  # type: ignore[arg-type]
    assert len(sleep.delays) == 3
    for n, delay in enumerate(sleep.delays):
        assert 7.0 <= delay <= 7.0 + min(MAX_DELAY, BASE_DELAY * 2**n)


def test_pushback_read_from_what_the_broker_sends() -> None:
    """The trailer built by broker.service.status is what the SDK reads."""
    error = ResourceExhausted("too many attaches", retry_after_seconds=4)
    sent = rpc_error(status_for(error), error.message, trailing_details(error))
    assert retry_pushback(sent) == 4.0
    assert retry_pushback(rpc_error(grpc.StatusCode.UNAVAILABLE, "x", retry_info(1, 500_000_000)))
    assert retry_pushback(rpc_error(grpc.StatusCode.UNAVAILABLE, "no details")) == 0.0
    garbage = (("grpc-status-details-bin", b"\xff\xff not a status"),)
    assert retry_pushback(rpc_error(grpc.StatusCode.UNAVAILABLE, "x", garbage)) == 0.0


@pytest.mark.parametrize(
    ("code", "details", "reason"),
    [
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "replaced by a newer Attach stream from the same device",
            "replaced",
        ),
        (grpc.StatusCode.UNAUTHENTICATED, "device certificate has been revoked", "refused"),
        (grpc.StatusCode.PERMISSION_DENIED, "device is revoked", "refused"),
    ],
)
@run_async
async def test_refusals_stop_the_loop(code: grpc.StatusCode, details: str, reason: str) -> None:
    stop = asyncio.Event()
    sleep = FakeSleep()
    refused = AttachEnd(rpc_error(code, details), 30.0)
    calls, attach_once = scripted([UNAVAILABLE, refused, UNAVAILABLE], stop)
    reconnector = Reconnector(Backoff(rng=random.Random(1)), sleep=sleep)
    result = await reconnector.run(attach_once, stop)  # type: ignore[arg-type]
    assert result.reason == reason and reconnector.stats.stop_reason == reason
    assert result.error is refused.error
    assert calls[0] == 2 and len(sleep.delays) == 1
    assert not stop.is_set()


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
)
def test_transient_ends_are_retried(code: grpc.StatusCode) -> None:
    assert judge(rpc_error(code, "x")).retry
    assert judge(None).retry  # the broker closed the stream cleanly


@run_async
async def test_stop_ends_a_live_attach_and_a_wait() -> None:
    stop = asyncio.Event()
    started = asyncio.Event()

    async def attach_forever() -> AttachEnd:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    reconnector = Reconnector()
    task = asyncio.ensure_future(reconnector.run(attach_forever, stop))
    await asyncio.wait_for(started.wait(), 5)
    stop.set()
    result = await asyncio.wait_for(task, 5)
    assert result.reason == "stopped" and reconnector.stats.attaches == 1

    # Stop during the backoff wait (real sleep, cut short by the event).
    stop = asyncio.Event()

    async def fail_then_stop() -> AttachEnd:
        asyncio.get_running_loop().call_later(0.05, stop.set)
        return AttachEnd(rpc_error(grpc.StatusCode.UNAVAILABLE, "gone"), None)

    backoff = Backoff(base=20, cap=20, rng=random.Random(0))
    backoff.attempt = 5
    reconnector = Reconnector(backoff)
    result = await asyncio.wait_for(reconnector.run(fail_then_stop, stop), 5)
    assert result.reason == "stopped"


# -- several replicas in one target ------------------------------------------------------------
def test_endpoints_take_a_list_or_a_comma_string() -> None:
    listed = Endpoints("127.0.0.1:1", ["127.0.0.1:2", "127.0.0.1:3"])
    joined = Endpoints("127.0.0.1:1", "127.0.0.1:2, 127.0.0.1:3")
    assert listed == joined and listed.main == "127.0.0.1:2,127.0.0.1:3"
    assert listed.main_addresses == ("127.0.0.1:2", "127.0.0.1:3")
    assert split_addresses(["a:1,b:2", "c:3"]) == ("a:1", "b:2", "c:3")


def test_ip_lists_become_one_target_with_the_tls_name_of_the_first() -> None:
    target, name = target_for("127.0.0.1:2,127.0.0.2:3")
    assert target in ("ipv4:127.0.0.1:2,127.0.0.2:3", "ipv4:127.0.0.2:3,127.0.0.1:2")
    assert name == "127.0.0.1"
    target, name = target_for(["[::1]:2", "[::2]:3"])
    assert target.startswith("ipv6:") and "[::1]:2" in target and name == "::1"
    # One address, or one DNS name (gRPC resolves every address behind it): unchanged.
    assert target_for("localhost:8443") == ("localhost:8443", None)
    assert target_for("dns:///broker.example:8443") == ("dns:///broker.example:8443", None)
    # Host names cannot share one target: each channel takes one of them.
    picks = {target_for("a.example:1,b.example:1")[0] for _ in range(50)}
    assert picks == {"a.example:1", "b.example:1"}
