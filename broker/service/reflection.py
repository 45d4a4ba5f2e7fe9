"""Server reflection, grpc.reflection.v1 and v1alpha, for the bootstrap listener.

grpcio-reflection ships only v1alpha. v1 is the same messages, field for field, in another package,
so its descriptor is derived from v1alpha's and the v1 RPC is answered by the same servicer (each
message re-encoded, the bytes being identical). Clients such as grpcurl ask v1 first.

The listed services are the listener's own; any file or symbol in the broker's protos (the main
listener's services included) resolves, so a client can fetch every descriptor from here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as alpha_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

_ALPHA_PACKAGE = "grpc.reflection.v1alpha"
_V1_PACKAGE = "grpc.reflection.v1"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _v1_file() -> FileDescriptor:
    """grpc/reflection/v1/reflection.proto in the default pool (added once, from v1alpha's)."""
    pool = descriptor_pool.Default()
    try:
        found: FileDescriptor = pool.FindFileByName(_V1_FILE)
        return found
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = _V1_PACKAGE
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    alpha_prefix, v1_prefix = f".{_ALPHA_PACKAGE}.", f".{_V1_PACKAGE}."
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(alpha_prefix, v1_prefix)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(alpha_prefix, v1_prefix)
            method.output_type = method.output_type.replace(alpha_prefix, v1_prefix)
    pool.AddSerializedFile(proto.SerializeToString())
    added: FileDescriptor = pool.FindFileByName(_V1_FILE)
    return added


_V1 = _v1_file()
V1ALPHA_SERVICE: ServiceDescriptor = alpha_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
V1_SERVICE: ServiceDescriptor = _V1.services_by_name["ServerReflection"]
_V1_REQUEST: Any = message_factory.GetMessageClass(
    _V1.message_types_by_name["ServerReflectionRequest"]
)
_V1_RESPONSE: Any = message_factory.GetMessageClass(
    _V1.message_types_by_name["ServerReflectionResponse"]
)


class Reflection:
    """One reflection servicer listing service_names, served as both v1alpha and v1."""

    def __init__(self, service_names: Sequence[str]) -> None:
        self.service_names = tuple(sorted(service_names))
        self._servicer = ReflectionServicer(self.service_names)

    def add_v1alpha(self, _servicer: object, server: grpc.aio.Server) -> None:
        alpha_pb2_grpc.add_ServerReflectionServicer_to_server(self._servicer, server)

    def add_v1(self, _servicer: object, server: grpc.aio.Server) -> None:
        handler = grpc.stream_stream_rpc_method_handler(
            self._info_v1, _V1_REQUEST.FromString, _V1_RESPONSE.SerializeToString
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    V1_SERVICE.full_name, {"ServerReflectionInfo": handler}
                ),
            )
        )

    async def _info_v1(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async def as_alpha() -> AsyncIterator[alpha_pb2.ServerReflectionRequest]:
            async for request in requests:
                yield alpha_pb2.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in self._servicer.ServerReflectionInfo(as_alpha(), context):
            yield _V1_RESPONSE.FromString(response.SerializeToString())
