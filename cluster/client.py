"""A client of the gRPC API: what `switch-serve generate --address HOST:PORT` runs."""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, CancelledError, ThreadPoolExecutor, wait

import grpc
from google.protobuf import json_format

from router_service.config import CLIENT_TIMEOUT_S, EngineConfig
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc
from router_service.requests import nth_seed


class RemoteError(RuntimeError):
    def __init__(self, error: grpc.RpcError):
        super().__init__(f"{error.code().name}: {error.details()}")
        self.code = error.code()


log = logging.getLogger(__name__)
MAX_IN_FLIGHT = EngineConfig.model_fields["max_sequences"].default  # calls a client keeps in flight: a default batch
# Waits between attempts: doubling from the first to the last, each a random part of it (so that clients refused
# together do not come back together), while the deadline leaves time.
FIRST_BACKOFF_S, LAST_BACKOFF_S = 0.5, 8.0


def retryable(error: grpc.RpcError) -> bool:
    """UNAVAILABLE (expert actors down, a replica not ready), RESOURCE_EXHAUSTED (a replica's queue full), or a
    front replica that died mid-request, which Serve's gRPC proxy reports as INTERNAL ("actor died", or "is
    unavailable" where it reached the replica over gRPC) and HAProxy at times as an HTTP error of its own, which gRPC
    reads as UNKNOWN ("Received http2 header with status: 500"). Generation has no side effects, so asking again is
    safe."""
    details = (error.details() or "").lower()
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED) or (
        error.code() == grpc.StatusCode.INTERNAL and ("actor died" in details or "is unavailable" in details)) or (
        error.code() == grpc.StatusCode.UNKNOWN and details.startswith("received http2 header with status: 5"))


def key_metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [] if api_key is None else [("authorization", f"Bearer {api_key}")]


def call_with_retries(method, request, deadline: float, metadata: list[tuple[str, str]],
                      given_up: threading.Event):
    """`method(request)`, asked again after each retryable failure, with a growing wait between, until `deadline`
    (time.monotonic()) or until `given_up` is set; the last failure as a RemoteError."""
    attempt = 0
    while not given_up.is_set():
        try:
            return method(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=metadata)
        except grpc.RpcError as e:
            wait_s = min(LAST_BACKOFF_S, FIRST_BACKOFF_S * 2 ** attempt) * random.uniform(0.5, 1.0)
            if not retryable(e) or time.monotonic() + wait_s >= deadline or given_up.wait(wait_s):
                raise RemoteError(e) from None
            attempt += 1
            log.warning("retrying a request after %s (attempt %d): %s", e.code().name, attempt + 1, e.details())
    raise CancelledError  # another call failed for good first


def generate_remote(address: str, prompts: list[list[int]] | list[str], *, logprobs: bool = False,
                    routing: bool = False, timeout: float = CLIENT_TIMEOUT_S, api_key: str | None = None,
                    **sampling) -> list[dict]:
    """One Generate call per prompt, MAX_IN_FLIGHT at once; results in prompt order, in the shape that the local
    `switch-serve generate` prints. A call that fails retryably is made again, until `timeout` seconds from the
    start have passed; the first that fails for good ends the others at once, and is raised."""
    deadline = time.monotonic() + timeout
    given = {k: v for k, v in sampling.items() if v is not None and v != []}
    requests = [pb.GenerateRequest(**({"text": p} if isinstance(p, str) else {"input_ids": p}),
                                   return_logprobs=logprobs, return_routing=routing,
                                   **given | ({"seed": nth_seed(given["seed"], i)} if "seed" in given else {}))
                for i, p in enumerate(prompts)]
    channel = grpc.insecure_channel(address)
    stub, metadata = pb_grpc.SwitchServeStub(channel), key_metadata(api_key)
    given_up = threading.Event()  # set as the calls end: those not begun are not, and none is retried
    pool = ThreadPoolExecutor(max(1, min(MAX_IN_FLIGHT, len(requests))))
    try:
        calls = [pool.submit(call_with_retries, stub.Generate, r, deadline, metadata, given_up) for r in requests]
        done, _ = wait(calls, return_when=FIRST_EXCEPTION)
        if failed := next((call for call in done if call.exception() is not None), None):
            raise failed.exception()
        responses = [call.result() for call in calls]
    finally:
        given_up.set()
        pool.shutdown(wait=False, cancel_futures=True)
        channel.close()  # the calls still in flight end at once
    results = []
    for prompt, r in zip(prompts, responses):
        out = {"token_ids": list(r.token_ids), "finish_reason": r.finish_reason, "dropped_tokens": r.dropped_tokens}
        if logprobs:
            out["logprobs"] = list(r.logprobs)
        if routing:
            out["routing"] = [json_format.MessageToDict(layer, preserving_proto_field_name=True,
                                                        always_print_fields_with_no_presence=True)
                              for layer in r.routing]
        if isinstance(prompt, str) or given.get("stop"):
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
