"""A served process that dies. A front replica: its in-flight requests end with a retryable status, the other
replica keeps serving, and Serve brings a new replica up (sharing the same expert actors). The expert fleet:
requests end with a retryable status or complete, health says NOT_SERVING until Serve's new fleet has loaded new
actors, and nothing of the old one is left."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve
from ray.util.placement_group import placement_group_table
from test_reliability import process_exists

from cluster import testing
from cluster.app import APP_NAME, FLEET_APP, local_serve, wait_until_serving
from cluster.demo import PROMPTS, WORDS
from cluster.testing import (
    busiest_replica,
    finish_streams,
    free_port,
    serve_constant,
    serve_proxies,
    wait_until_decoding,
    write_random_checkpoint_with_tokenizer,
)
from experts.placement import PlacementConfig
from router_service import server
from router_service.config import ServerConfig
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc
from router_service.server import FLEET_DEPLOYMENT, FRONT_DEPLOYMENT, ServedFleet


def replica_names(deployment: str = FRONT_DEPLOYMENT) -> list[str]:
    return testing.replica_names(FLEET_APP if deployment == FLEET_DEPLOYMENT else APP_NAME, deployment)


def both_replicas_serving(timeout_s: float = 180) -> None:
    """Serve has replaced a replica an earlier test killed, and both replicas serve: a call sent meanwhile may go to
    the dead one (INTERNAL, "actor is unavailable")."""
    deadline = time.monotonic() + timeout_s
    while len(replica_names()) < 2:
        assert time.monotonic() < deadline, "Serve did not replace the replica"
        time.sleep(0.2)
    wait_until_serving(serve.get_deployment_handle(FRONT_DEPLOYMENT, APP_NAME), 2, deadline - time.monotonic())


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tmp_path_factory):
    """Two front replicas on a random model (it rarely emits EOS, so requests run their full length)."""
    path = tmp_path_factory.mktemp("front-failure")
    write_random_checkpoint_with_tokenizer(path, WORDS)
    config = ServerConfig(model=str(path), placement=PlacementConfig(experts_per_actor=4), num_replicas=2,
                          local_experts=False)  # the actors' failures are what these tests are about
    with local_serve(config, http_port=free_port(), grpc_port=free_port()) as served:
        with grpc.insecure_channel(served.grpc) as channel:
            yield {"stub": pb_grpc.SwitchServeStub(channel), "address": served.grpc,
                   "health": health_pb2_grpc.HealthStub(channel), "config": config}


def test_killed_front_replica(two_replicas):
    stub = two_replicas["stub"]
    # The proxy passes calls to the fronts over gRPC (CONTROLLER_ENV, which the proxies inherit): its streams too
    # must end retryably when a front dies.
    assert [serve_constant(proxy, "RAY_SERVE_PROXY_USE_GRPC") for proxy in serve_proxies()] == [True]
    before = replica_names()
    assert len(before) == 2
    probe = pb.GenerateRequest(text="sort : 3 1 2", max_new_tokens=8)
    expected = stub.Generate(probe, timeout=60).token_ids
    replicas = [ray.get_actor(name, namespace="serve") for name in before]

    def carried() -> list[int]:
        return ray.get([replica.get_num_ongoing_requests.remote() for replica in replicas], timeout=60)

    # Streams on both replicas, sampled so that they run their full length: Serve spreads them, but at random, so
    # more are opened while one replica has none (all of six go to one replica 2 times in 64).
    streams, requests, firsts, rests = [], [], [], []
    while len(streams) < 6 or 0 in carried():
        assert len(streams) < 24, f"Serve sent every stream to one replica: {carried()}"
        i = len(streams)
        requests.append(pb.GenerateRequest(text=PROMPTS[i % len(PROMPTS)], max_new_tokens=200, temperature=1.0,
                                           seed=i))
        streams.append(stub.GenerateStream(requests[-1], timeout=120))
        firsts.append(list(next(streams[-1]).token_ids))
    killed = time.monotonic()
    ray.kill(replicas[0], no_restart=True)
    outcomes, details = finish_streams(streams, rests)
    print(f"\nstreams after a replica was killed: {outcomes}; {details}")
    assert "OK" in outcomes and len(outcomes) == len(streams)  # the other replica's finished; none hung
    assert "UNAVAILABLE" in outcomes and set(outcomes) == {"OK", "UNAVAILABLE"}, outcomes
    assert all("actor" in d.lower() and any(w in d.lower() for w in ("died", "dead", "unavailable"))
               for d in details), details

    assert stub.Generate(probe, timeout=60).token_ids == expected  # still serving meanwhile
    deadline = time.monotonic() + 120
    while len(replica_names()) < 2 or replica_names() == before:
        assert time.monotonic() < deadline, "Serve did not replace the replica"
        time.sleep(0.2)
    print(f"a new replica {time.monotonic() - killed:.1f} s after the kill")
    for _ in range(4):
        assert stub.Generate(probe, timeout=60).token_ids == expected
    # The other replica's streams whole, each as the same request makes it without a kill (sampled, seeded).
    again = [stub.Generate.future(request, timeout=60) for request in requests]
    for first, rest, outcome, answer in zip(firsts, rests, outcomes, again):
        if outcome == "OK":
            assert first + rest == list(answer.result().token_ids)


def test_unary_requests_on_a_dying_replica_still_complete(two_replicas, caplog):
    """`generate --address` (cluster.client) gets every answer when a replica dies under its requests, each the
    one a run without the kill gets (sampled, seeded): Serve re-sends some of them itself, and the client asks again
    for those that fail with the replica's death (which statuses it asks again for: test_client). Fails if an
    answer is lost, cut short, or made again otherwise than it was asked."""
    import logging

    from cluster.client import generate_remote

    stub = two_replicas["stub"]
    both_replicas_serving()
    prompts, result = [PROMPTS[i % len(PROMPTS)] for i in range(8)], {}
    clean = generate_remote(two_replicas["address"], prompts, max_new_tokens=200, temperature=1.0, seed=7)

    def run():
        try:
            result["outputs"] = generate_remote(two_replicas["address"], prompts, max_new_tokens=200, temperature=1.0,
                                                seed=7)
        except Exception as e:
            result["error"] = e

    with caplog.at_level(logging.WARNING, logger="cluster.client"):
        thread = threading.Thread(target=run)
        thread.start()
        wait_until_decoding(stub)
        ray.kill(busiest_replica(APP_NAME, FRONT_DEPLOYMENT), no_restart=True)  # one that carries some of them
        thread.join(180)
    print(f"\nclient retries: {caplog.text.count('retrying a request after')}")
    assert "error" not in result, result.get("error")
    assert len(result["outputs"]) == 8 and all(o["finish_reason"] for o in result["outputs"])
    assert [o["token_ids"] for o in result["outputs"]] == [o["token_ids"] for o in clean]


def fleet_groups() -> list[tuple[str, str]]:
    return [(g["name"], g["placement_group_id"]) for g in placement_group_table().values()
            if g["name"].startswith(f"{FLEET_APP}-") and g["state"] != "REMOVED"]


def test_killed_fleet_comes_back_by_itself(two_replicas):
    """Fails if nothing restarts the owner of the expert actors (the fleet as a plain detached actor, as it once
    was), if a front keeps its dead actors (router_service.engine.ExpertLink), or if health stays SERVING."""
    stub, health = two_replicas["stub"], two_replicas["health"]
    both_replicas_serving()
    probe = pb.GenerateRequest(text="sort : 3 1 2", max_new_tokens=8)
    expected = stub.Generate(probe, timeout=60).token_ids
    old_pids = [a.pid for a in stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).actors]
    (old_group,) = fleet_groups()
    streams = [stub.GenerateStream(pb.GenerateRequest(text=PROMPTS[i % len(PROMPTS)], max_new_tokens=200,
                                                      temperature=1.0, seed=i), timeout=120) for i in range(8)]
    for s in streams:
        next(s)
    (fleet,) = replica_names(FLEET_DEPLOYMENT)
    killed = time.monotonic()
    ray.kill(ray.get_actor(fleet, namespace="serve"), no_restart=True)  # Serve starts another
    # Health turns NOT_SERVING once a front has noticed, before the new fleet has loaded (a tiny model's loads in
    # about 10 s): looked for at once, not after the streams, which a slow machine may take as long to end.
    states, status = [health.Check(health_pb2.HealthCheckRequest(), timeout=10).status], ""
    while states[-1] != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() - killed < 30:
        states.append(health.Check(health_pb2.HealthCheckRequest(), timeout=10).status)
        time.sleep(0.1)
    outcomes, _ = finish_streams(streams)
    assert set(outcomes) <= {"OK", "UNAVAILABLE"} and "UNAVAILABLE" in outcomes, outcomes

    while states[-1] != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() - killed < 180, f"not serving again: {status}"
        states.append(health.Check(health_pb2.HealthCheckRequest(), timeout=10).status)
        status = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).status
        time.sleep(0.2)
    recovered = time.monotonic() - killed
    assert health_pb2.HealthCheckResponse.NOT_SERVING in states
    # Both replicas come back with the new actors: each front's link finds them on its own, so one may serve some
    # seconds before the other, and calls spread over them at random (a few in a row may all go to one).
    wait_until_serving(serve.get_deployment_handle(FRONT_DEPLOYMENT, APP_NAME), 2, 180 - (time.monotonic() - killed))
    print(f"\nstreams when the fleet was killed: {outcomes}; one replica serving again after {recovered:.1f} s, "
          f"both after {time.monotonic() - killed:.1f} s")
    for _ in range(4):
        assert stub.Generate(probe, timeout=60).token_ids == expected
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.status == "serving" and len(info.actors) == len(old_pids)
    assert not {a.pid for a in info.actors} & set(old_pids)
    assert not any(process_exists(pid) for pid in old_pids)
    (new_group,) = fleet_groups()  # the old group removed, not left holding its CPUs
    assert new_group[0] == old_group[0] and new_group[1] != old_group[1]


def test_a_change_to_the_fronts_config_lets_every_stream_finish_and_keeps_the_experts(two_replicas):
    """A changed front setting (here max_waiting) deployed while 16 streams run: Serve rebuilds the fronts'
    application (a change to its args gives its deployments a new version), the old front replicas drain
    (drain_timeout_s) and every stream completes; the fleet's application is another, so the experts stay loaded:
    the same fleet, the same actors, and health, asked throughout, says SERVING. Fails if the fronts' graceful
    shutdown is shorter than the streams (Serve's default is 20 s), or if the fleet is part of the fronts'
    application (as it once was: every change reloaded the experts)."""

    from cluster.app import build_app

    stub = two_replicas["stub"]
    fleet_before, fronts_before = replica_names(FLEET_DEPLOYMENT), replica_names()
    pids_before = [a.pid for a in stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).actors]
    groups_before = fleet_groups()
    streams = [stub.GenerateStream(pb.GenerateRequest(text=PROMPTS[i % len(PROMPTS)], max_new_tokens=120,
                                                      temperature=1.0, seed=i), timeout=300) for i in range(16)]
    firsts = [next(s) for s in streams]
    changed = two_replicas["config"].model_copy(update={"max_waiting": two_replicas["config"].max_waiting + 1})
    deploy = threading.Thread(target=serve.run, args=(build_app(changed),), kwargs={"name": APP_NAME,
                                                                                      "route_prefix": "/"})
    health, states = two_replicas["health"], []

    def ask_health() -> None:
        while deploy.is_alive():
            try:
                states.append(health_pb2.HealthCheckResponse.ServingStatus.Name(
                    health.Check(health_pb2.HealthCheckRequest(), timeout=10).status))
            except grpc.RpcError as e:
                states.append(e.code().name)
            time.sleep(0.02)

    deploy.start()
    asking = threading.Thread(target=ask_health)
    asking.start()
    reasons = []
    for first, s in zip(firsts, streams):
        chunks = [first, *s]  # raises if the stream was cut
        reasons.append(chunks[-1].finish_reason)
    deploy.join(300)
    asking.join(30)
    assert all(reasons), reasons
    assert set(states) == {"SERVING"}, {state: states.count(state) for state in set(states)}
    assert not set(replica_names()) & set(fronts_before)
    deadline = time.monotonic() + 120
    while stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).status != "serving":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert replica_names(FLEET_DEPLOYMENT) == fleet_before and fleet_groups() == groups_before
    assert [a.pid for a in stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).actors] == pids_before


def test_a_fleet_stopped_where_serve_cannot_say_whose_fronts_to_wait_for_still_releases_its_actors(monkeypatch):
    """A fleet waits for its fronts to drain before it releases its actors and their placement group; where that
    cannot be asked (no replica context, or no drain timeout configured yet), it releases them at once. Fails if
    either is read before the release's `try`: a new config's fleet names its group otherwise, so nothing would
    remove the old one."""
    fleet, released = stopping_fleet(loaded=True), []
    fleet.release = lambda: released.append(True)

    def no_context():
        raise RuntimeError("no replica context")

    monkeypatch.setattr(server.serve, "get_replica_context", no_context)
    with pytest.raises(RuntimeError, match="no replica context"):
        ServedFleet.func_or_class.__del__(fleet)
    assert released == [True]


def test_a_stopping_fleet_gives_each_draining_front_its_whole_timeout(monkeypatch):
    """Serve rolls the fronts out a few at a time: a front may begin to drain well after the fleet began to stop. The
    fleet keeps its actors until the fronts have stopped, each for up to the drain timeout from when it began, and
    releases them as soon as none drains. Fails if the timeout runs from the fleet's own stop (the last front's
    streams would lose their experts part way)."""
    from types import SimpleNamespace

    now, released = [0.0], []
    # The fronts' application as the fleet sees it over time: one front drains until 40 s, the next from 55 s to 100 s.
    def fronts_changing(app):
        t = now[0]
        return (True, 1) if t < 40 else (True, 0) if t < 55 else (True, 1) if t < 100 else (False, 0)

    monkeypatch.setattr(server.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(server.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    monkeypatch.setattr(server, "fronts_changing", fronts_changing)
    monkeypatch.setattr(server.serve, "get_replica_context", lambda: SimpleNamespace(app_name=FLEET_APP))
    fleet = stopping_fleet(loaded=True)
    fleet.drain_timeout_s, fleet.release = 60.0, lambda: released.append(now[0])
    ServedFleet.func_or_class.__del__(fleet)
    assert released == [100.0]


def test_a_stopping_fleet_that_never_loaded_releases_at_once(monkeypatch):
    """A fleet whose load failed (or had yet to end) handed no front its actors: stopped while the fronts' application
    is still deploying (its fronts wait for their experts), it releases at once, and Serve's next try starts without
    waiting out the drain timeout. Fails if it waits for fronts that never used it. (ExpertFleet.loaded in each
    state: tests/experts/test_fleet.py.)"""
    from types import SimpleNamespace

    monkeypatch.setattr(server, "fronts_changing", lambda app: (True, 0))
    monkeypatch.setattr(server.serve, "get_replica_context", lambda: SimpleNamespace(app_name=FLEET_APP))
    monkeypatch.setattr(server.time, "sleep", lambda s: pytest.fail("waited for fronts that never had its actors"))
    fleet, released = stopping_fleet(loaded=False), []
    fleet.drain_timeout_s, fleet.release = 60.0, lambda: released.append(True)
    ServedFleet.func_or_class.__del__(fleet)
    assert released == [True]


def stopping_fleet(loaded: bool):
    """A fleet replica, built without its constructor, for its stop alone."""
    class Stopping(ServedFleet.func_or_class):
        def __del__(self):  # the probe's own end releases nothing
            pass

    fleet = object.__new__(Stopping)
    fleet.loaded = loaded
    return fleet


def test_a_fleet_replacing_one_of_its_own_config_waits_for_it_to_stop(monkeypatch):
    """The app deployed anew with the same fleet args (another runtime_env, say): the new fleet bears the old one's
    name, and so do the old one's placement groups, which it would remove as a dead predecessor's while the old
    fleet still keeps its actors for the fronts draining. It waits while a replica of its deployment stops and groups
    of its name exist; groups of another name, or none stopping (a predecessor whose process died), do not hold it.
    Fails if the new fleet removes a draining fleet's groups."""
    from types import SimpleNamespace

    from experts import fleet as fleet_module

    stopping, groups = [1], {"a": {"name": "app-0123456789-node0", "state": "CREATED"}}

    def status():
        states = {"STOPPING": stopping[0], "RUNNING": 1} if stopping[0] else {"RUNNING": 1}
        return SimpleNamespace(applications={FLEET_APP: SimpleNamespace(deployments={
            FLEET_DEPLOYMENT: SimpleNamespace(replica_states=states)})})

    monkeypatch.setattr(server.serve, "status", status)
    monkeypatch.setattr(server.serve, "get_replica_context", lambda: SimpleNamespace(app_name=FLEET_APP))
    monkeypatch.setattr(fleet_module, "placement_group_table", lambda: groups)
    fleet = stopping_fleet(loaded=False)
    fleet.name = "app-0123456789"
    assert fleet._predecessor_stopping()
    fleet.name = "app-9876543210"  # another config's fleet: the old groups are not its to remove
    assert not fleet._predecessor_stopping()
    fleet.name, stopping[0] = "app-0123456789", 0  # left by a fleet whose process died
    assert not fleet._predecessor_stopping()


def test_a_fleet_whose_check_for_a_stopping_predecessor_fails_waits_only_where_groups_of_its_name_exist(
        monkeypatch):
    """Serve's controller not answering (starting again, say): groups of the fleet's name may be a draining
    fleet's, so it waits for an answer rather than remove them; without such groups it starts. Fails if an
    unanswered question lets it remove a draining fleet's actors, or holds a fleet that has nothing to wait for."""
    from types import SimpleNamespace

    from experts import fleet as fleet_module

    def status():
        raise ConnectionError("the controller is gone")

    groups = {"a": {"name": "app-0123456789-node0", "state": "CREATED"}}
    monkeypatch.setattr(server.serve, "status", status)
    monkeypatch.setattr(server.serve, "get_replica_context", lambda: SimpleNamespace(app_name=FLEET_APP))
    monkeypatch.setattr(fleet_module, "placement_group_table", lambda: groups)
    fleet = stopping_fleet(loaded=False)
    fleet.name = "app-0123456789"
    assert fleet._predecessor_stopping()
    fleet.name = "app-9876543210"
    assert not fleet._predecessor_stopping()
