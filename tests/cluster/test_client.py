"""The bundled gRPC client (cluster.client): which failed calls it asks again."""

from __future__ import annotations

import grpc
import pytest

from cluster.client import retryable


class StatusFromProxy(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code, details, retry", [
    (grpc.StatusCode.UNAVAILABLE, "expert actors are down", True),
    (grpc.StatusCode.INTERNAL, "The actor died unexpectedly before finishing this task.", True),
    (grpc.StatusCode.INTERNAL, "The actor ce26 is unavailable: Actor is unavailable.. The task may or may not have "
                               "been executed on the actor.", True),  # the proxy reached the replica over gRPC
    (grpc.StatusCode.INTERNAL, "division by zero", False),
    (grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens: must be at least 1", False),
])
def test_the_client_asks_again_only_where_a_front_or_the_experts_were_lost(code, details, retry):
    assert retryable(StatusFromProxy(code, details)) is retry
