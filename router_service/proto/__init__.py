"""The gRPC API: the code generated from switch_serve.proto, and its services' registration with Serve's proxy
(grpc_servicer_functions)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2

from router_service.proto import switch_serve_pb2 as pb


class UndecodableRequest:
    """What a method gets for a request whose bytes are no valid message of its type (a string field that is not
    UTF-8, say): the method refuses it as bad input, where gRPC would answer UNKNOWN before any method ran."""

    def __init__(self, reason: str):
        self.reason = reason


def reader(message_type):
    """A request deserializer: the message, or an UndecodableRequest saying why there is none."""
    def read(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as e:  # protobuf's DecodeError: its message names no field
            return UndecodableRequest(f"not a valid {message_type.DESCRIPTOR.full_name} ({str(e).split(': ')[-1]})")
    return read


def register(server, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    """As the generated registrations add their handlers."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def add_switch_serve_to_server(servicer, server) -> None:
    """switchserve.v1.SwitchServe as switch_serve_pb2_grpc registers it, but for how requests are read (`reader`)."""
    service, handlers = pb.DESCRIPTOR.services_by_name["SwitchServe"], {}
    for method in service.methods:
        handler = grpc.unary_stream_rpc_method_handler if method.server_streaming else \
            grpc.unary_unary_rpc_method_handler
        handlers[method.name] = handler(getattr(servicer, method.name),
                                        request_deserializer=reader(getattr(pb, method.input_type.name)),
                                        response_serializer=getattr(pb, method.output_type.name).SerializeToString)
    register(server, service.full_name, handlers)


def add_health_check_to_server(servicer, server) -> None:
    """grpc.health.v1.Health with Check alone. Watch is left out, so gRPC itself answers it UNIMPLEMENTED, which the
    health protocol's clients take as "poll Check": each watcher's stream would hold one of a replica's request slots
    for as long as it watched, and health calls ask for no API key."""
    register(server, "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(
        servicer.Check, request_deserializer=reader(health_pb2.HealthCheckRequest),
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString)})
