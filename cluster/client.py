"""A client of the gRPC API: what `switch-serve generate --address HOST:PORT` runs."""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import json_format

from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc


class RemoteError(RuntimeError):
    def __init__(self, error: grpc.RpcError):
        super().__init__(f"{error.code().name}: {error.details()}")
        self.code = error.code()


log = logging.getLogger(__name__)
ATTEMPTS = 3


def retryable(error: grpc.RpcError) -> bool:
    """UNAVAILABLE (expert actors down, a replica not ready), or a front replica that died mid-request, which
    Serve's gRPC proxy reports as INTERNAL ("actor died", or "is unavailable" where it reached the replica over
    gRPC). Generation has no side effects, so asking again is safe."""
    details = (error.details() or "").lower()
    return error.code() == grpc.StatusCode.UNAVAILABLE or (
        error.code() == grpc.StatusCode.INTERNAL and ("actor died" in details or "is unavailable" in details))


def key_metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [] if api_key is None else [("authorization", f"Bearer {api_key}")]


def generate_remote(address: str, prompts: list[list[int]] | list[str], *, logprobs: bool = False,
                    routing: bool = False, timeout: float | None = None, api_key: str | None = None,
                    **sampling) -> list[dict]:
    """One Generate call per prompt, all in flight at once; results in prompt order, in the shape that the
    local `switch-serve generate` prints. A call that fails retryably is made again, 3 attempts in all."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SwitchServeStub(channel)
        requests = [pb.GenerateRequest(**({"text": p} if isinstance(p, str) else {"input_ids": p}),
                                       return_logprobs=logprobs, return_routing=routing,
                                       **{k: v for k, v in sampling.items() if v is not None and v != []})
                    for p in prompts]
        calls = [stub.Generate.future(r, timeout=timeout, metadata=key_metadata(api_key)) for r in requests]
        responses = []
        for request, call in zip(requests, calls):
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    responses.append(call.result())
                    break
                except grpc.RpcError as e:
                    if attempt == ATTEMPTS or not retryable(e):
                        raise RemoteError(e) from None
                    log.warning("retrying a request after %s: %s", e.code().name, e.details())
                    time.sleep(0.5 * attempt)  # time for Serve to stop routing to a replica that died
                    call = stub.Generate.future(request, timeout=timeout, metadata=key_metadata(api_key))
    results = []
    for prompt, r in zip(prompts, responses):
        out = {"token_ids": list(r.token_ids), "finish_reason": r.finish_reason, "dropped_tokens": r.dropped_tokens}
        if logprobs:
            out["logprobs"] = list(r.logprobs)
        if routing:
            out["routing"] = [json_format.MessageToDict(layer, preserving_proto_field_name=True,
                                                        always_print_fields_with_no_presence=True)
                              for layer in r.routing]
        if isinstance(prompt, str):
            out["text"] = r.text
        results.append(out)
    return results


def model_info(address: str, timeout: float = 30.0, api_key: str | None = None) -> pb.ModelInfoResponse:
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.SwitchServeStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=timeout,
                                                              metadata=key_metadata(api_key))
        except grpc.RpcError as e:
            raise RemoteError(e) from None
