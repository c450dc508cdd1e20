"""The bundled gRPC client (cluster.client): which failed calls it asks again, how long for, and how many it keeps
in flight."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster import client
from cluster.client import retryable
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc


class StatusFromProxy(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code, details, retry", [
    (grpc.StatusCode.UNAVAILABLE, "expert actors are down", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "64 sequences already waiting, room for 64", True),
    (grpc.StatusCode.INTERNAL, "The actor died unexpectedly before finishing this task.", True),
    (grpc.StatusCode.INTERNAL, "The actor ce26 is unavailable: Actor is unavailable.. The task may or may not have "
                               "been executed on the actor.", True),  # the proxy reached the replica over gRPC
    (grpc.StatusCode.UNKNOWN, "Received http2 header with status: 500", True),  # HAProxy's, a front lost behind it
    (grpc.StatusCode.UNKNOWN, "Exception calling application: boom", False),
    (grpc.StatusCode.INTERNAL, "division by zero", False),
    (grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens: must be at least 1", False),
])
def test_the_client_asks_again_only_where_a_front_or_the_experts_were_lost(code, details, retry):
    assert retryable(StatusFromProxy(code, details)) is retry


class Flaky(pb_grpc.SwitchServeServicer):
    """Refuses each prompt's first `refusals` calls with `code`, then answers its ids back; counts calls at once."""

    def __init__(self, code: grpc.StatusCode, refusals: int):
        self.code, self.refusals, self.calls, self.in_flight, self.most = code, refusals, Counter(), 0, 0
        self.lock = threading.Lock()

    def Generate(self, request, context):
        key = tuple(request.input_ids)
        with self.lock:
            self.calls[key] += 1
            refused = self.calls[key] <= self.refusals
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            if refused:
                context.abort(self.code, "refused")
            time.sleep(0.05)
            return pb.GenerateResponse(token_ids=request.input_ids, finish_reason="eos")
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def flaky_server():
    servers = []

    def start(code: grpc.StatusCode, refusals: int) -> tuple[str, Flaky]:
        servicer = Flaky(code, refusals)
        server = grpc.server(ThreadPoolExecutor(max_workers=64))
        pb_grpc.add_SwitchServeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for server in servers:
        server.stop(0)


def test_the_client_rides_out_refusals_with_a_growing_wait_and_a_bounded_window(flaky_server, monkeypatch):
    """A full queue (RESOURCE_EXHAUSTED) and experts down (UNAVAILABLE) for several attempts in a row: every answer
    comes, in prompt order, with at most MAX_IN_FLIGHT calls at once. Fails if the client gives up after a fixed
    few attempts, or sends every prompt at once."""
    monkeypatch.setattr(client, "FIRST_BACKOFF_S", 0.01)
    monkeypatch.setattr(client, "MAX_IN_FLIGHT", 4)
    prompts = [[i, 1] for i in range(2, 14)]
    for code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        address, servicer = flaky_server(code, refusals=5)
        results = client.generate_remote(address, prompts, timeout=60)
        assert [r["token_ids"] for r in results] == prompts
        assert set(servicer.calls.values()) == {6} and servicer.most <= 4


def test_the_clients_timeout_bounds_the_whole_call_and_a_lasting_failure_is_said(flaky_server, monkeypatch):
    """Retries stop at the deadline, counted from the start, not from each attempt; a call refused for a reason
    that asking again cannot mend fails at once, naming the status. Fails if the retries go on past the deadline."""
    monkeypatch.setattr(client, "FIRST_BACKOFF_S", 0.2)
    address, _ = flaky_server(grpc.StatusCode.UNAVAILABLE, refusals=1000)
    began = time.monotonic()
    with pytest.raises(client.RemoteError, match="UNAVAILABLE: refused"):
        client.generate_remote(address, [[5, 1], [6, 1]], timeout=2)
    assert time.monotonic() - began < 4
    address, servicer = flaky_server(grpc.StatusCode.INVALID_ARGUMENT, refusals=1000)
    with pytest.raises(client.RemoteError, match="INVALID_ARGUMENT"):
        client.generate_remote(address, [[5, 1]], timeout=60)
    assert sum(servicer.calls.values()) == 1


class SlowAndBad(pb_grpc.SwitchServeServicer):
    """Answers prompt [5, 1] after 5 s, refuses [6, 1] as bad input at once, answers the others after 0.1 s."""

    def __init__(self):
        self.calls = 0

    def Generate(self, request, context):
        self.calls += 1
        if list(request.input_ids) == [6, 1]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input_ids: bad")
        time.sleep(5 if list(request.input_ids) == [5, 1] else 0.1)
        return pb.GenerateResponse(token_ids=request.input_ids, finish_reason="eos")


def test_a_call_that_fails_for_good_ends_the_others_at_once(monkeypatch):
    """The first call to fail for good is raised as it fails, not once the calls before it in prompt order have
    answered; the calls in flight end with it, and those not begun are not made. Fails if the client waits on the
    slow first prompt, or goes on sending the rest."""
    monkeypatch.setattr(client, "MAX_IN_FLIGHT", 4)
    servicer = SlowAndBad()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_SwitchServeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        began = time.monotonic()
        with pytest.raises(client.RemoteError, match="INVALID_ARGUMENT: input_ids: bad"):
            client.generate_remote(f"127.0.0.1:{port}", [[5, 1], [6, 1]] + [[7, i] for i in range(100)], timeout=60)
        assert time.monotonic() - began < 2.5 and servicer.calls < 20
    finally:
        server.stop(0)


class Refusing:
    """A stub's method refusing its first `refusals` calls with UNAVAILABLE, then answering "done"."""

    def __init__(self, refusals: int):
        self.refusals, self.calls = refusals, 0

    def __call__(self, request, timeout, metadata):
        self.calls += 1
        if self.calls <= self.refusals:
            raise StatusFromProxy(grpc.StatusCode.UNAVAILABLE, "expert actors are down")
        return "done"


class Waits:
    """A `given_up` event that records each wait asked of it and returns at once; set after `set_after` waits."""

    def __init__(self, set_after: int | None = None):
        self.waits, self.set_after = [], set_after

    def is_set(self) -> bool:
        return self.set_after is not None and len(self.waits) >= self.set_after

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return self.is_set()


def test_the_wait_between_attempts_doubles_up_to_its_cap(monkeypatch):
    """Without its random part, the waits go 0.5, 1, 2, 4, 8 s and stay at 8. Fails if the wait does not grow,
    grows past the cap, or a refusal is not asked again."""
    monkeypatch.setattr(client.random, "uniform", lambda low, high: high)
    method, waits = Refusing(refusals=7), Waits()
    assert client.call_with_retries(method, None, time.monotonic() + 3600, [], waits) == "done"
    assert waits.waits == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0] and method.calls == 8


def test_a_given_up_call_stops_asking(monkeypatch):
    """Once another call has failed for good (`given_up` set during a wait), the refusal is raised and no more
    attempts are made; a call whose turn comes after that is not made at all. Fails if the waits go on."""
    method, waits = Refusing(refusals=100), Waits(set_after=2)
    with pytest.raises(client.RemoteError, match="UNAVAILABLE: expert actors are down"):
        client.call_with_retries(method, None, time.monotonic() + 3600, [], waits)
    assert method.calls == 2 and len(waits.waits) == 2
    with pytest.raises(client.CancelledError):
        client.call_with_retries(method, None, time.monotonic() + 3600, [], waits)
    assert method.calls == 2


def test_a_calls_prompts_ask_each_for_a_seed_of_its_own():
    """generate_remote(prompts, seed=s) asks for prompt i's samples with seed s + i, as the Python API draws them: the
    same prompt twice gets two samples, the call again the same two; without a seed, none. Fails if every prompt asks
    for the one seed."""

    class Seeds(pb_grpc.SwitchServeServicer):
        def Generate(self, request, context):
            seed = request.seed if request.HasField("seed") else -1
            return pb.GenerateResponse(token_ids=[seed], finish_reason="eos")

    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SwitchServeServicer_to_server(Seeds(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        seeded = client.generate_remote(address, [[5, 1]] * 3, seed=7, temperature=1.0, timeout=30)
        assert [r["token_ids"] for r in seeded] == [[7], [8], [9]]
        assert [r["token_ids"] for r in client.generate_remote(address, [[5, 1]] * 2, timeout=30)] == [[-1], [-1]]
        with pytest.raises(ValueError, match=r"^seed: must be between 0 and 2\*\*64 - 1, got -1"):
            client.generate_remote(address, [[5, 1]], seed=-1, timeout=30)  # not sent as 2**64 - 1
    finally:
        server.stop(0)
