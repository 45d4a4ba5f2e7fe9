"""Server reflection and health on the bootstrap listener (issue 8, item 5).

Reflection: both grpc.reflection.v1 (what grpcurl asks first) and v1alpha, through the standard
grpcio-reflection client; it lists the bootstrap listener's own services, and any broker.v1 file or
symbol (the main listener's services included) resolves. Health: "" and every service the broker
serves on any listener answer SERVING; an unknown name is NOT_FOUND; everything turns NOT_SERVING
as soon as the broker starts stopping.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from broker._proto.broker.v1 import bootstrap_pb2
from tests.conftest import start_broker
from tests.helpers import RunningBroker, bootstrap_stub, rpc_error

BOOTSTRAP_SERVICES = [
    "broker.v1.Bootstrap",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
]
MAIN_SERVICES = ["broker.v1.AdminService", "broker.v1.AppService", "broker.v1.DeviceService"]
HEALTH_NAMES = ["", *BOOTSTRAP_SERVICES, *MAIN_SERVICES]


class _V1Stub:
    """grpc.reflection.v1's ServerReflectionInfo. grpcio-reflection ships only a v1alpha client;
    v1 has the same messages field for field, so its bytes are v1alpha's on another method path
    (exactly what grpcurl sends)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.ServerReflectionInfo = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=alpha_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=alpha_pb2.ServerReflectionResponse.FromString,
        )


def reflection_db(channel: grpc.Channel, version: str) -> ProtoReflectionDescriptorDatabase:
    database = ProtoReflectionDescriptorDatabase(channel)
    if version == "v1":
        database._stub = _V1Stub(channel)
    return database


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_bootstrap_services_and_resolves_descriptors(
    broker: RunningBroker, version: str
) -> None:
    channel, _ = bootstrap_stub(broker)
    with channel:
        database = reflection_db(channel, version)
        assert sorted(database.get_services()) == BOOTSTRAP_SERVICES
        pool = descriptor_pool.DescriptorPool(database)

        # A listed service, resolved by symbol, matches the compiled protos exactly.
        served = pool.FindServiceByName("broker.v1.Bootstrap")
        compiled = bootstrap_pb2.DESCRIPTOR.services_by_name["Bootstrap"]
        assert [
            (m.name, m.input_type.full_name, m.output_type.full_name) for m in served.methods
        ] == [(m.name, m.input_type.full_name, m.output_type.full_name) for m in compiled.methods]
        assert served.file.name == "broker/v1/bootstrap.proto"
        assert pool.FindFileByName("broker/v1/device.proto").package == "broker.v1"

        # The reflection service describes itself in this version's package.
        info = pool.FindServiceByName(f"grpc.reflection.{version}.ServerReflection").methods[0]
        assert info.input_type.full_name == f"grpc.reflection.{version}.ServerReflectionRequest"
        assert info.client_streaming and info.server_streaming

        # The main listener's services are not listed here, but their descriptors resolve.
        for name in MAIN_SERVICES:
            assert pool.FindServiceByName(name).full_name == name
        with pytest.raises(KeyError):
            pool.FindServiceByName("broker.v1.NoSuchService")

        # What grpcurl does next: call an RPC with messages built from the reflected descriptors.
        method = served.methods_by_name["GetTrustBundle"]
        request = message_factory.GetMessageClass(method.input_type)()
        response_class = message_factory.GetMessageClass(method.output_type)
        raw = channel.unary_unary("/broker.v1.Bootstrap/GetTrustBundle")(
            request.SerializeToString(), timeout=10
        )
        assert response_class.FromString(raw).ListFields()


def test_health_answers_for_every_served_service_and_not_found_otherwise(
    broker: RunningBroker,
) -> None:
    channel, _ = bootstrap_stub(broker)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in HEALTH_NAMES:
            response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, name
        for unknown in ["broker.v1.NoSuchService", "broker.v1.bootstrap", "Bootstrap"]:
            error = rpc_error(
                health.Check, health_pb2.HealthCheckRequest(service=unknown), timeout=10
            )
            assert error.code() is grpc.StatusCode.NOT_FOUND, unknown


def test_health_turns_not_serving_for_every_name_when_the_broker_stops(tmp_path: Path) -> None:
    """Watch each name (SERVING), begin the stop, and read NOT_SERVING on every stream before
    the listeners close: the status is flipped first, while streams are still served."""
    import asyncio

    running: RunningBroker = start_broker(tmp_path)
    stopping = None
    channel, _ = bootstrap_stub(running)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        watches = {
            name: health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=30)
            for name in HEALTH_NAMES
        }
        for name, watch in watches.items():
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING, name
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(10.0), running.loop)
        for name, watch in watches.items():
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING, name
            watch.cancel()
        stopping.result(30)
    finally:
        channel.close()
        if stopping is None:
            asyncio.run_coroutine_threadsafe(running.server.stop(0.2), running.loop).result(30)
        running.loop.call_soon_threadsafe(running.loop.stop)
