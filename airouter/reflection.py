"""gRPC server reflection over v1 (what newer grpcurl, buf curl and IDE clients ask first) and
v1alpha, so that every symbol a server lists can be described.

grpcio-reflection serves v1alpha only and finds symbols with the descriptor pool's
FindFileContainingSymbol, which knows services, messages and enums but not a method or a
field ("grpcurl describe airouter.v1.Gateway.Generate" answered "Symbol not found"); and the
v1 service it was served under had no descriptor to describe. The two versions' messages are
the same field for field: one servicer answers both names, and v1's file is v1alpha's renamed.
"""

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async as reflection_async
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor() -> None:
    """Adds grpc/reflection/v1/reflection.proto to the default pool: v1alpha's file with the
    package renamed (as grpc's own reflection.proto files are)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, "grpc.reflection.v1"
    proto.name, proto.package = _V1_FILE, new
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(f".{old}.", f".{new}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{old}.", f".{new}.")
            method.output_type = method.output_type.replace(f".{old}.", f".{new}.")
    proto.options.Clear()
    pool.AddSerializedFile(proto.SerializeToString())


class _Reflection(reflection_async.ReflectionServicer):
    """grpcio-reflection's servicer, finding methods and fields as well."""

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        answer = super()._file_containing_symbol(request, name)
        if not answer.HasField("error_response"):
            return answer
        parent, _, member = name.rpartition(".")
        pool = descriptor_pool.Default()
        # A method is found through its service, a field through its message.
        for find, members in (
            (pool.FindServiceByName, "methods_by_name"),
            (pool.FindMessageTypeByName, "fields_by_name"),
        ):
            try:
                if member in getattr(find(parent), members):
                    return super()._file_containing_symbol(request, parent)
            except KeyError:
                pass
        return answer


def serve_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Reflection for `service_names` and itself, under both versions' names."""
    _add_v1_descriptor()
    servicer = _Reflection([*service_names, V1ALPHA, V1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
