"""Request bodies that do not decode (issue 8, item 4), on every listener and every RPC.

Malformed protobuf, or a string field that is not valid UTF-8, is the caller's mistake: the broker
answers INVALID_ARGUMENT with a message naming the expected message type and nothing internal
(grpc's own deserializer would give UNKNOWN "Unexpected <class '...DecodeError'>"), after the
identity check, and writes nothing. The RPCs are enumerated from the service descriptors, so a new
RPC is covered without touching this file.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor

from broker._proto.broker.v1 import admin_pb2, app_pb2, bootstrap_pb2, device_pb2
from broker.service.reflection import V1_SERVICE, V1ALPHA_SERVICE
from tests.helpers import (
    RunningBroker,
    audit_entries,
    birth_credentials,
    bootstrap_stub,
    count_rows,
    device_count,
    enroll_device,
    mtls_channel,
    new_user,
    rpc_error,
    session_rows,
)

DEVICE = "cam-0001"
MALFORMED = {
    "truncated": b"\x0a\x05ab",  # field 1 claims 5 bytes, 2 follow
    "bad-wire-type": b"\x0f",  # field 1 with wire type 7
    "overlong-varint": b"\x08" + b"\xff" * 10 + b"\x01",
}
INTERNAL_WORDS = (
    "DecodeError",
    "Exception",
    "<class",
    "Traceback",
    "google.protobuf",
    "Unexpected",
)


def bad_utf8(message: Descriptor) -> bytes | None:
    """The message with its first string field set to bytes that are not UTF-8 (None if it has
    no string field)."""
    for field in message.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return bytes([field.number << 3 | 2, 2]) + b"\xff\xfe"
    return None


def payloads(method: MethodDescriptor) -> dict[str, bytes]:
    cases = dict(MALFORMED)
    utf8 = bad_utf8(method.input_type)
    if utf8 is not None:
        cases["bad-utf8"] = utf8
    return cases


def expected_details(method: MethodDescriptor) -> str:
    return (
        f"request is not a valid {method.input_type.full_name} message: "
        "malformed protobuf or a string field that is not valid UTF-8"
    )


def call_raw(channel: grpc.Channel, method: MethodDescriptor, body: bytes) -> grpc.RpcError:
    """Send body as the (first) request message of method; return the error it must end with."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    with pytest.raises(grpc.RpcError) as info:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path)(iter([body]), timeout=10))
        elif method.server_streaming:
            list(channel.unary_stream(path)(body, timeout=10))
        elif method.client_streaming:
            channel.stream_unary(path)(iter([body]), timeout=10)
        else:
            channel.unary_unary(path)(body, timeout=10)
    error = info.value
    assert isinstance(error, grpc.RpcError)
    return error


def assert_refused_plainly(error: grpc.RpcError, method: MethodDescriptor, case: str) -> None:
    where = f"{method.full_name} [{case}]"
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (where, error.code(), error.details())
    details = error.details() or ""
    assert details == expected_details(method), (where, details)
    assert not any(word in details for word in INTERNAL_WORDS), (where, details)


def snapshot(broker: RunningBroker) -> tuple[object, ...]:
    """Everything a refused request could have written."""
    return (
        device_count(broker),
        count_rows(broker, "users"),
        count_rows(broker, "app_instances"),
        count_rows(broker, "certificates"),
        count_rows(broker, "enrollment_tokens"),
        count_rows(broker, "grants"),
        tuple(session_rows(broker, DEVICE)),
        len(audit_entries(broker)),
    )


def sweep(channel: grpc.Channel, methods: list[MethodDescriptor]) -> int:
    """Every malformed body to every method; each must be refused plainly. Returns the count."""
    calls = 0
    for method in methods:
        for case, body in payloads(method).items():
            assert_refused_plainly(call_raw(channel, method, body), method, case)
            calls += 1
    return calls


def methods_of(*services: object) -> list[MethodDescriptor]:
    return [m for service in services for m in service.methods]  # type: ignore[attr-defined]


# -- bootstrap: anonymous TLS ------------------------------------------------------------------------


def test_bootstrap_listener_refuses_undecodable_requests_on_every_rpc(
    broker: RunningBroker, operator_channel: grpc.Channel
) -> None:
    enroll_device(broker, operator_channel, DEVICE)
    from grpc_health.v1 import health_pb2

    services = [
        bootstrap_pb2.DESCRIPTOR.services_by_name["Bootstrap"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        V1ALPHA_SERVICE,
        V1_SERVICE,
    ]
    before = snapshot(broker)
    channel, _ = bootstrap_stub(broker)
    with channel:
        assert sweep(channel, methods_of(*services)) >= 4 * 9
        # The repro, byte for byte.
        repro = channel.unary_unary("/broker.v1.Bootstrap/EnrollDevice")
        error = rpc_error(repro, b"\x0a\x02\xff\xfe", timeout=10)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == (
            "request is not a valid broker.v1.EnrollDeviceRequest message: "
            "malformed protobuf or a string field that is not valid UTF-8"
        )
    assert snapshot(broker) == before


# -- factory: mutual TLS with a birth certificate ------------------------------------------------


FACTORY_ALLOWED = {"GetTrustBundle", "EnrollDevice"}  # the rest admit nobody on this listener


def test_factory_listener_refuses_undecodable_requests_after_the_acl(broker: RunningBroker) -> None:
    key_pem, cert_pem = birth_credentials(broker, DEVICE)
    bootstrap = bootstrap_pb2.DESCRIPTOR.services_by_name["Bootstrap"]
    allowed = [m for m in bootstrap.methods if m.name in FACTORY_ALLOWED]
    denied = [m for m in bootstrap.methods if m.name not in FACTORY_ALLOWED]
    assert len(allowed) == len(FACTORY_ALLOWED) and denied
    before = snapshot(broker)
    with mtls_channel(broker.factory, broker.pki.ca_pem, key_pem, cert_pem) as channel:
        sweep(channel, allowed)
        for method in denied:  # identity and ACL come first: a malformed body changes nothing
            for case, body in payloads(method).items():
                error = call_raw(channel, method, body)
                assert error.code() is grpc.StatusCode.PERMISSION_DENIED, (method.name, case)
    assert snapshot(broker) == before


# -- main: mutual TLS, one identity kind per service -------------------------------------------


MAIN_SERVICES = [
    device_pb2.DESCRIPTOR.services_by_name["DeviceService"],
    app_pb2.DESCRIPTOR.services_by_name["AppService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
]


def test_main_listener_refuses_undecodable_requests_on_every_rpc(
    broker: RunningBroker, operator_channel: grpc.Channel
) -> None:
    device = enroll_device(broker, operator_channel, DEVICE)
    app = new_user(broker, "alice")
    before = snapshot(broker)
    with device.channel(broker) as as_device, app.channel(broker) as as_app:
        callers = {
            "broker.v1.DeviceService": as_device,
            "broker.v1.AppService": as_app,
            "broker.v1.AdminService": operator_channel,
        }
        assert {s.full_name for s in MAIN_SERVICES} == set(callers)
        for service in MAIN_SERVICES:
            calls = sweep(callers[service.full_name], list(service.methods))
            assert calls >= 3 * len(service.methods)
    assert snapshot(broker) == before


def test_main_listener_checks_identity_before_decoding(
    broker: RunningBroker, operator_channel: grpc.Channel
) -> None:
    """A malformed body from the wrong identity kind is PERMISSION_DENIED, as a valid one is."""
    device = enroll_device(broker, operator_channel, DEVICE)
    app = new_user(broker, "alice")
    admin = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    attach = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].methods_by_name["Attach"]
    watch = app_pb2.DESCRIPTOR.services_by_name["AppService"].methods_by_name["Watch"]
    before = snapshot(broker)
    with device.channel(broker) as as_device, app.channel(broker) as as_app:
        for channel, method in [
            (as_device, admin.methods_by_name["ListDevices"]),
            (as_device, watch),
            (as_app, attach),
        ]:
            error = call_raw(channel, method, MALFORMED["truncated"])
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED, method.full_name
    assert snapshot(broker) == before


# -- a bad message on an open Attach stream ------------------------------------------------------


def test_a_malformed_message_on_an_open_attach_stream_ends_it_with_invalid_argument(
    broker: RunningBroker, operator_channel: grpc.Channel
) -> None:
    device = enroll_device(broker, operator_channel, DEVICE)
    hello = device_pb2.DeviceMessage(hello=device_pb2.Hello(trust_bundle_version="test"))
    accepted, done = threading.Event(), threading.Event()

    def requests() -> Iterator[bytes]:
        yield hello.SerializeToString()
        if accepted.wait(10):
            yield MALFORMED["truncated"]
        done.wait(10)  # keep our side open: the broker must be the one to end the stream

    before = snapshot(broker)
    with device.channel(broker) as channel:
        call = channel.stream_stream("/broker.v1.DeviceService/Attach")(requests(), timeout=15)
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for raw in call:
                message = device_pb2.BrokerMessage.FromString(raw)
                received.append(message.WhichOneof("kind"))
                if message.HasField("accepted"):
                    accepted.set()
        done.set()
    assert received[0] == "accepted"
    error = info.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details() == (
        "request is not a valid broker.v1.DeviceMessage message: "
        "malformed protobuf or a string field that is not valid UTF-8"
    )
    # The stream is gone from presence, and the refusal wrote nothing.
    assert broker.on_loop(_handle_of(broker, DEVICE)) is None
    assert snapshot(broker) == before


async def _handle_of(broker: RunningBroker, device_id: str) -> object:
    import asyncio

    for _ in range(100):
        if broker.server.runtime.presence.handle(device_id) is None:
            return None
        await asyncio.sleep(0.02)
    return broker.server.runtime.presence.handle(device_id)
