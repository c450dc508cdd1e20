"""A front replica that dies: its in-flight requests end with a retryable status, the other replica keeps
serving, and Serve brings a new replica up (sharing the same expert actors)."""

from __future__ import annotations

import time

import grpc
import pytest
import ray

from cluster.app import local_serve
from cluster.demo import PROMPTS, WORDS
from cluster.testing import free_port, write_random_checkpoint_with_tokenizer
from experts.placement import PlacementConfig
from router_service.config import ServerConfig
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc


def replica_names() -> list[str]:
    """The named actors Serve runs the app's replicas in."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == "serve"
                  and a["name"].startswith("SERVE_REPLICA::switch-serve#SwitchServer"))


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tmp_path_factory):
    """Two front replicas on a random model (it rarely emits EOS, so requests run their full length)."""
    path = tmp_path_factory.mktemp("front-failure")
    write_random_checkpoint_with_tokenizer(path, WORDS)
    config = ServerConfig(model=str(path), placement=PlacementConfig(experts_per_actor=4), num_replicas=2)
    with local_serve(config, http_port=free_port(), grpc_port=free_port()) as served:
        with grpc.insecure_channel(served.grpc) as channel:
            yield {"stub": pb_grpc.SwitchServeStub(channel), "address": served.grpc}


def test_killed_front_replica(two_replicas):
    stub = two_replicas["stub"]
    before = replica_names()
    assert len(before) == 2
    probe = pb.GenerateRequest(text="sort : 3 1 2", max_new_tokens=8)
    expected = stub.Generate(probe, timeout=60).token_ids
    # Streams on both replicas (Serve spreads them), sampled so that they run their full length.
    streams = [stub.GenerateStream(pb.GenerateRequest(text=PROMPTS[i % len(PROMPTS)], max_new_tokens=200,
                                                      temperature=1.0, seed=i), timeout=120) for i in range(6)]
    for s in streams:
        next(s)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    outcomes, details = [], set()
    for s in streams:
        try:
            for _ in s:
                pass
            outcomes.append("OK")
        except grpc.RpcError as e:
            outcomes.append(e.code().name)
            details.add(e.details().splitlines()[0])
    print(f"\nstreams after a replica was killed: {outcomes}; {details}")
    assert "OK" in outcomes and len(outcomes) == len(streams)  # the other replica's finished; none hung
    assert "UNAVAILABLE" in outcomes and set(outcomes) == {"OK", "UNAVAILABLE"}, outcomes
    assert all("actor" in d.lower() and ("died" in d.lower() or "dead" in d.lower()) for d in details), details

    assert stub.Generate(probe, timeout=60).token_ids == expected  # still serving meanwhile
    deadline = time.monotonic() + 120
    while len(replica_names()) < 2 or replica_names() == before:
        assert time.monotonic() < deadline, "Serve did not replace the replica"
        time.sleep(1)
    for _ in range(4):
        assert stub.Generate(probe, timeout=60).token_ids == expected


def test_unary_requests_on_a_dying_replica_still_complete(two_replicas, caplog):
    """`generate --address` (cluster.client) gets every answer when a replica dies under its requests: Serve
    re-sends some of them itself, and the client asks again for those that fail with the replica's death."""
    import logging
    import threading

    from cluster.client import generate_remote

    stub = two_replicas["stub"]
    deadline = time.monotonic() + 120
    while len(replica_names()) < 2:  # the previous test's replacement is up
        assert time.monotonic() < deadline
        time.sleep(1)
    result = {}

    def run():
        try:
            result["outputs"] = generate_remote(two_replicas["address"], [PROMPTS[i % len(PROMPTS)] for i in range(8)],
                                                max_new_tokens=200, temperature=1.0, seed=7)
        except Exception as e:
            result["error"] = e

    with caplog.at_level(logging.WARNING, logger="cluster.client"):
        thread = threading.Thread(target=run)
        thread.start()
        while stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).active_sequences == 0:  # decoding has begun
            time.sleep(0.01)
        ray.kill(ray.get_actor(replica_names()[0], namespace="serve"), no_restart=True)
        thread.join(180)
    print(f"\nclient retries: {caplog.text.count('retrying a request after')}")
    assert "error" not in result, result.get("error")
    assert len(result["outputs"]) == 8 and all(o["finish_reason"] for o in result["outputs"])
