"""The gRPC API: the code generated from switch_serve.proto, and grpc.health.v1.Health's registration with Serve."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2


def add_health_check_to_server(servicer, server) -> None:
    """grpc.health.v1.Health with Check alone, for Serve's grpc_servicer_functions. Watch is left out, so gRPC itself
    answers it UNIMPLEMENTED, which the health protocol's clients take as "poll Check": each watcher's stream would
    hold one of a replica's request slots for as long as it watched, and health calls ask for no API key."""
    check = grpc.unary_unary_rpc_method_handler(servicer.Check,
                                                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                                                response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": check}),))
