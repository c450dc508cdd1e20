"""Each KubeRay manifest's own Ray cluster, run on this machine: its head and worker groups started as local
raylets with the groups' GPU counts, custom resources and API key environment, and its own serveConfigV2 deployed
the way KubeRay deploys it (a PUT to the dashboard's Serve API), with the model swapped for a tiny checkpoint and
the plan made smaller. CPUs are capped at this machine's cores; Ray schedules GPUs and custom resources as counts,
so the actors given them run on the CPU."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import grpc
import pytest
import ray
import yaml
from reference import ROOT, hf_generate, wait_until
from test_app import fronts_args

from cluster.app import APP_NAME, FLEET_APP
from cluster.client import RemoteError, generate_remote, key_metadata
from cluster.testing import (
    finish_streams,
    free_port,
    replica_class,
    serve_constant,
    serve_controller,
    tiny_config,
    write_random_checkpoint,
)
from experts.wire import torch_dtype
from router_service.auth import API_KEY_ENV
from router_service.config import CONTROLLER_ENV
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc
from router_service.server import FLEET_DEPLOYMENT, FRONT_DEPLOYMENT

MANIFESTS = ROOT / "manifests"
CPU_CAP = 2  # this machine's cores
API_KEY = "topology-test-key"
PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [7, 3, 1], [14, 15, 16, 50, 27, 1]]
NEW_TOKENS = 6
DEPLOY_TIMEOUT_S = 240
STALL_S = 20  # longer than a new config takes to build and to stop the old fleet; shorter than the drain timeout
# While the app deploys or loads its experts, or a front's node is lost (Serve's proxy says INTERNAL for a replica
# that died under a call).
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}
# The Ray actor classes of the fleet's and the fronts' Serve replicas.
FLEET = replica_class(FLEET_APP, FLEET_DEPLOYMENT)
FRONT = replica_class(APP_NAME, FRONT_DEPLOYMENT)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@dataclass
class Group:
    """A head or worker group of a RayService, as the Ray nodes its pods start."""

    name: str
    pods: int
    cpus: int
    gpus: int
    resources: dict[str, float]
    env: dict[str, str] = field(default_factory=dict)

    def node_args(self) -> dict:
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "resources": self.resources,
                "object_store_memory": 80 * 2**20, "env_vars": self.env}


def group_of(spec: dict, name: str, pods: int) -> Group:
    params = spec.get("rayStartParams", {})
    container = spec["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    gpus = int(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    resources = json.loads(json.loads(params["resources"])) if "resources" in params else {}
    # The container's environment; a Secret's key becomes this test's key where the pods take it.
    env = {e["name"]: API_KEY if e["name"] == API_KEY_ENV else e["value"] for e in container.get("env", [])
           if e["name"] == API_KEY_ENV or "value" in e}
    return Group(name, pods, min(CPU_CAP, int(limits.get("cpu", 1))), gpus, resources, env)


def groups_of(manifest: dict) -> list[Group]:
    cluster = manifest["spec"]["rayClusterConfig"]
    return [group_of(cluster["headGroupSpec"], "head", 1),
            *[group_of(g, g["groupName"], g["replicas"]) for g in cluster["workerGroupSpecs"]]]


class ManifestCluster:
    """The Ray cluster a RayService manifest describes, started here; `node_group` maps node ids to group names."""

    def __init__(self, file: str):
        from ray.cluster_utils import Cluster

        self.manifest = yaml.safe_load((MANIFESTS / file).read_text())
        self.groups = {g.name: g for g in groups_of(self.manifest)}
        self.dashboard_port = free_port()
        head = self.groups["head"]
        self.cluster = Cluster(initialize_head=True, head_node_args={
            **head.node_args(), "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": self.dashboard_port})
        self.node_group = {self.cluster.head_node.node_id: "head"}
        self.nodes: dict[str, list] = {"head": [self.cluster.head_node]}
        for group in self.groups.values():
            for _ in range(group.pods if group.name != "head" else 0):
                self.add_pod(group.name)
        self.cluster.wait_for_nodes()
        self.ports = {"http": free_port(), "grpc": free_port()}
        self.processes: list[subprocess.Popen] = []  # pods started as processes of their own (start_pod_process)

    def add_pod(self, group: str):
        node = self.cluster.add_node(**self.groups[group].node_args())
        self.node_group[node.node_id] = group
        self.nodes.setdefault(group, []).append(node)
        return node

    def start_pod_process(self, group: str) -> tuple[subprocess.Popen, str]:
        """A pod of `group` as KubeRay starts one: `ray start --block` joining the cluster, with the group's resources
        and its container's environment, in a process of its own, which a SIGTERM reaches as Kubernetes' does; the
        process, and its node's id."""
        g = self.groups[group]

        def alive() -> set[str]:
            return {node["NodeID"] for node in ray.nodes() if node["Alive"]}

        before = alive()
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--block", f"--address={self.cluster.address}",
             f"--num-cpus={g.cpus}", f"--num-gpus={g.gpus}", f"--resources={json.dumps(g.resources)}",
             f"--object-store-memory={80 * 2**20}"],
            env={**os.environ, **g.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.processes.append(process)
        wait_for(lambda: len(alive() - before) == 1, f"a {group} pod's node to join", timeout_s=60)
        (node_id,) = alive() - before
        self.node_group[node_id] = group
        return process, node_id

    def remove_pod(self, node) -> None:
        self.cluster.remove_node(node)
        self.nodes[self.node_group[node.node_id]].remove(node)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def serve_config(self, model: str, fronts: dict | None = None, **placement) -> dict:
        """The manifest's serveConfigV2 with the model swapped, the plan changed as given, the fronts' other
        settings as given, and this machine's free ports."""
        config = yaml.safe_load(self.manifest["spec"]["serveConfigV2"])
        config["http_options"] |= {"host": "127.0.0.1", "port": self.ports["http"]}
        config["grpc_options"]["port"] = self.ports["grpc"]
        for application in config["applications"]:  # the fleet's and the fronts'
            application["args"]["model"] = model
            application["args"]["placement"] |= placement
        fronts_args(config).update(fronts or {})
        return config

    def deploy(self, config: dict) -> None:
        """What KubeRay does with serveConfigV2: PUT it to the dashboard's Serve API."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.dashboard_port}/api/serve/applications/",
                                         data=json.dumps(config).encode(), method="PUT",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200

    def app_statuses(self) -> dict[str, str]:
        """What KubeRay reads to tell the service's health: each application's status."""
        url = f"http://127.0.0.1:{self.dashboard_port}/api/serve/applications/"
        with urllib.request.urlopen(url, timeout=60) as response:
            return {name: app["status"] for name, app in json.load(response)["applications"].items()}

    def wait_until_running(self) -> None:
        wait_for(lambda: set(self.app_statuses().values()) == {"RUNNING"}, "every application RUNNING")

    def shutdown(self) -> None:
        for process in self.processes:  # their Ray processes with them, once their drain has given up on the cluster
            process.terminate()
        for process in self.processes:
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
        ray.shutdown()
        self.cluster.shutdown()


@contextlib.contextmanager
def manifest_cluster(file: str):
    from conftest import instead_of_shared_ray

    # Ray's token auth off, as on the manifests' clusters: a local ray.init earlier in this process turns it on (in
    # its environment) for every cluster started after it, whose dashboard then refuses the deploy. And Serve's proxies
    # choosing among every front: here every node's proxy listens on the same port of one machine and takes the
    # connections the kernel hands it, and one on a front's node would send them all to its own front (where each
    # pod has an address of its own, the Service spreads the connections over the pods).
    env = {"RAY_AUTH_MODE": "disabled", "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
    with instead_of_shared_ray(), mock.patch.dict(os.environ, env):
        cluster = ManifestCluster(file)
        try:
            ray.init(address=cluster.cluster.address, logging_level=logging.WARNING)
            yield cluster
        finally:
            cluster.shutdown()


def alive_actors(class_name: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
            if a.class_name == class_name]


def groups_holding(cluster: ManifestCluster, class_name: str) -> list[str]:
    return sorted(cluster.node_group[a.node_id] for a in alive_actors(class_name))


def generate_until(address: str, expected: list[list[int]], timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Generate until the served app answers (it may still be deploying or loading its experts), then check the
    tokens."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            outputs = generate_remote(address, PROMPTS, max_new_tokens=NEW_TOKENS, timeout=60, api_key=API_KEY)
            break
        except RemoteError as e:
            if e.code not in RETRYABLE or time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert [o["token_ids"] for o in outputs] == expected


def wait_for(condition, what: str, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """wait_until with a deployment's timeout, looking every second."""
    wait_until(condition, what, timeout_s, poll_s=1.0)


def placement_groups(state: str) -> list:
    from ray.util.state import list_placement_groups

    return list_placement_groups(filters=[("state", "=", state)], detail=True)


def check_nothing_of_the_old_plan_is_left(actors: int) -> None:
    """One fleet, and the placement groups of its nodes (one each), holding every live expert actor, and none else."""
    wait_for(lambda: len(alive_actors("ExpertActor")) == actors and len(alive_actors(FLEET)) == 1,
             "the old fleet and its actors to go")
    groups = placement_groups("CREATED")
    assert {a.placement_group_id for a in alive_actors("ExpertActor")} == {g.placement_group_id for g in groups}
    assert len({g.name.rsplit("-node", 1)[0] for g in groups}) == 1, [g.name for g in groups]
    assert not placement_groups("PENDING") and not placement_groups("RESCHEDULING")


def head_proxy_only(config: dict) -> dict:
    """`config` with Serve's proxy on the head alone. Here every node's proxy listens on the same port of one machine
    and takes the connections the kernel hands it: one on a front's node, lost with the node, would end every stream
    of its connection, whichever front carried it (where each pod has an address of its own, a client reaches the
    pods that live)."""
    return config | {"proxy_location": "HeadOnly"}


def reference_tokens(cluster: ManifestCluster, hf_model) -> list[list[int]]:
    """transformers' greedy tokens in the dtype the manifest serves in."""
    dtype = fronts_args(yaml.safe_load(cluster.manifest["spec"]["serveConfigV2"]))["dtype"]
    return [tokens for tokens, _ in hf_generate(hf_model.to(torch_dtype(dtype)), PROMPTS, NEW_TOKENS)]


def sampled_stream(stub, i: int):
    """Stream `i` of a test: sampled (a random model rarely ends one early), 100 tokens."""
    return stub.GenerateStream(pb.GenerateRequest(input_ids=PROMPTS[i % len(PROMPTS)], max_new_tokens=100,
                                                  temperature=1.0, seed=i), timeout=300, metadata=key_metadata(API_KEY))


def start_streams(address: str, count: int) -> tuple[grpc.Channel, list]:
    """`count` sampled streams, each past its first chunk."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.SwitchServeStub(channel)
    streams = [sampled_stream(stub, i) for i in range(count)]
    for stream in streams:
        next(stream)
    return channel, streams


def stall_every_expert_actor(seconds: float) -> None:
    """Each of the fleet's expert actors stalls this long in its next call (ExpertActor.inject_fault). Asked from a
    Ray task: Serve keeps its handles' state per process, and this one's may be of an earlier test's cluster."""
    @ray.remote(num_cpus=0)
    def stall() -> None:
        from ray import serve

        view = serve.get_deployment_handle(FLEET_DEPLOYMENT, FLEET_APP).actors.remote(0.0).result()
        ray.get([actor.inject_fault.remote(at_call=1, stall_s=seconds) for actor in view.actors])

    ray.get(stall.remote(), timeout=60)


def ids(class_name: str) -> set[str]:
    return {a.actor_id for a in alive_actors(class_name)}


def test_switch_base_8_manifest(tmp_path):
    """The fronts and the fleet on the head, one expert actor per GPU worker, answers equal to transformers'
    and the API key required; Serve's controller runs with CONTROLLER_ENV (serveConfigV2's controller_options,
    which KubeRay's deploy passes on). A change to the fronts' settings keeps the fleet and its actors. The plan
    changed in place onto a third GPU worker (as the autoscaler would add one) while streams run: every stream
    ends whole, and nothing of the old plan is left."""
    with manifest_cluster("rayservice-switch-base-8.yaml") as cluster:
        expected = reference_tokens(cluster, write_random_checkpoint(tmp_path, tiny_config(num_experts=8)))
        cluster.deploy(cluster.serve_config(str(tmp_path)))
        cluster.wait_until_running()
        generate_until(cluster.grpc_address, expected)
        args = fronts_args(yaml.safe_load(cluster.manifest["spec"]["serveConfigV2"]))
        assert groups_holding(cluster, FRONT) == ["head"] * args["num_replicas"]
        assert groups_holding(cluster, FLEET) == ["head"]
        assert groups_holding(cluster, "ExpertActor") == ["experts"] * args["placement"]["gpus"]
        assert (serve_constant(serve_controller(), "CONTROL_LOOP_INTERVAL_S")
                == float(CONTROLLER_ENV["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]))
        with pytest.raises(RemoteError) as refused:
            generate_remote(cluster.grpc_address, PROMPTS[:1], max_new_tokens=1, timeout=30)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED

        fronts, fleet, actors = ids(FRONT), ids(FLEET), ids("ExpertActor")
        cluster.deploy(cluster.serve_config(str(tmp_path), fronts={"max_waiting": args.get("max_waiting", 64) + 1}))
        wait_for(lambda: len(ids(FRONT) - fronts) == args["num_replicas"] and not ids(FRONT) & fronts,
                 "new front replicas")
        cluster.wait_until_running()
        generate_until(cluster.grpc_address, expected)
        assert ids(FLEET) == fleet and ids("ExpertActor") == actors

        cluster.add_pod("experts")
        channel, streams = start_streams(cluster.grpc_address, 8)
        with channel:
            stall_every_expert_actor(STALL_S)  # keeps the streams running until well after the old fleet stops
            cluster.deploy(cluster.serve_config(str(tmp_path), gpus=3, nodes=3))
            outcomes, details = finish_streams(streams)
        assert outcomes == ["OK"] * len(streams), details
        cluster.wait_until_running()
        wait_for(lambda: len({a.node_id for a in alive_actors("ExpertActor")}) == 3, "actors on three nodes")
        generate_until(cluster.grpc_address, expected)
        check_nothing_of_the_old_plan_is_left(actors=3)
        assert groups_holding(cluster, "ExpertActor") == ["experts"] * 3


def test_switch_c_2048_manifest(tmp_path):
    """switch-c-2048's layout, with a look-alike of 2048 experts a layer on a smaller plan (3 of its 48 GPUs, then
    6): the fronts on the front GPU pods, the fleet on the head, the expert actors on the 8-GPU pods, answers equal
    to transformers'. Losing the node of a front leaves the fleet and every expert actor as they were, and the
    other front serving; a new front pod gets a front again. That pod stopped as Kubernetes stops one (SIGTERM to its
    `ray start`, which drains the node) ends every stream whole, its front started again on a spare pod. The plan
    changed in place over all six expert pods leaves nothing of the old one."""
    config = tiny_config(vocab_size=64, d_model=8, d_kv=4, num_heads=2, d_ff=8, num_experts=2048, num_layers=2,
                         num_decoder_layers=2, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)
    with manifest_cluster("rayservice-switch-c-2048.yaml") as cluster:
        expected = reference_tokens(cluster, write_random_checkpoint(tmp_path, config))
        cluster.deploy(head_proxy_only(cluster.serve_config(str(tmp_path), gpus=3, nodes=3)))
        cluster.wait_until_running()
        generate_until(cluster.grpc_address, expected)
        assert groups_holding(cluster, FRONT) == ["front", "front"]
        assert groups_holding(cluster, FLEET) == ["head"]
        assert groups_holding(cluster, "ExpertActor") == ["experts"] * 3

        fleet, actors = ids(FLEET), ids("ExpertActor")
        # Streams on both fronts, held by the actors (each stalls in its next call) while the node of one goes:
        # that front's end retryably, the other front's complete. Opened until both fronts carry some: Serve's
        # proxy may send a burst to one front.
        stall_every_expert_actor(STALL_S)
        fronts = alive_actors(FRONT)
        replicas = [ray.get_actor(front.name, namespace="serve") for front in fronts]
        channel = grpc.insecure_channel(cluster.grpc_address)
        stub, streams, carried = pb_grpc.SwitchServeStub(channel), [], [0] * len(fronts)
        with channel:
            while len(streams) < 6 or 0 in carried:
                assert len(streams) < 24, f"Serve's proxy sent every stream to one front: {carried}"
                streams.append(sampled_stream(stub, len(streams)))
                time.sleep(0.3)  # on its way to a front
                carried = ray.get([replica.get_num_ongoing_requests.remote() for replica in replicas], timeout=60)
            lost = next(n for n in cluster.nodes["front"] if n.node_id == fronts[0].node_id)
            cluster.remove_pod(lost)
            lost_at = time.monotonic()
            outcomes, details = finish_streams(streams)
        print(f"\nstreams as a front's node was lost ({carried[0]} of them on it): {outcomes}; {details}")
        assert outcomes.count("OK") == carried[1] and set(outcomes) <= {"OK", "UNAVAILABLE", "INTERNAL"}, details
        generate_until(cluster.grpc_address, expected)  # the other front
        print(f"served again {time.monotonic() - lost_at:.1f} s after the node was lost")
        assert ids(FLEET) == fleet and ids("ExpertActor") == actors
        # As KubeRay would, for the pod lost: `ray start --block` in a process of its own, as a pod runs it.
        pod, pod_node = cluster.start_pod_process("front")
        wait_for(lambda: groups_holding(cluster, FRONT) == ["front", "front"], "a front on the new pod")
        cluster.wait_until_running()
        generate_until(cluster.grpc_address, expected)
        assert ids(FLEET) == fleet and ids("ExpertActor") == actors

        # Kubernetes stopping that pod (its node drained for an upgrade, say) sends `ray start` SIGTERM: Ray drains
        # the node for up to the manifest's RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S while streams run on its front,
        # which Serve starts again on a spare front pod; every stream ends whole.
        spare = cluster.add_pod("front")
        (front,) = [a for a in alive_actors(FRONT) if a.node_id == pod_node]
        replica = ray.get_actor(front.name, namespace="serve")
        channel = grpc.insecure_channel(cluster.grpc_address)
        stub, streams = pb_grpc.SwitchServeStub(channel), []
        with channel:
            while len(streams) < 6 or not ray.get(replica.get_num_ongoing_requests.remote(), timeout=60):
                assert len(streams) < 24, "Serve's proxy sent no stream to the front of the pod to stop"
                streams.append(sampled_stream(stub, len(streams)))
                next(streams[-1])  # on a front
            stall_every_expert_actor(STALL_S)  # keeps the streams running well into the drain
            on_pod = ray.get(replica.get_num_ongoing_requests.remote(), timeout=60)
            assert on_pod > 0  # still running as the pod is told to stop
            drain_s = float(cluster.groups["front"].env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
            signalled = time.monotonic()
            pod.terminate()
            pod.wait(drain_s + 30)
            stopped_after = time.monotonic() - signalled
            print(f"the pod's Ray stopped {stopped_after:.1f} s after SIGTERM, {on_pod} of {len(streams)} streams on "
                  "its front")
            assert stopped_after < drain_s  # once Serve had left the node, not at the drain's deadline
            outcomes, details = finish_streams(streams)
        assert outcomes == ["OK"] * len(streams), details
        assert groups_holding(cluster, FRONT) == ["front", "front"]
        assert spare.node_id in {a.node_id for a in alive_actors(FRONT)}
        generate_until(cluster.grpc_address, expected)
        assert ids(FLEET) == fleet and ids("ExpertActor") == actors

        cluster.deploy(head_proxy_only(cluster.serve_config(str(tmp_path), gpus=6, nodes=6)))
        cluster.wait_until_running()
        wait_for(lambda: len({a.node_id for a in alive_actors("ExpertActor")}) == 6, "actors on six nodes")
        generate_until(cluster.grpc_address, expected)
        check_nothing_of_the_old_plan_is_left(actors=6)
        assert groups_holding(cluster, "ExpertActor") == ["experts"] * 6
