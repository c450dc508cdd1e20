"""Experts spread over several Ray nodes by the planner, through a placement group, with replicas of the
busiest experts; outputs still equal transformers'."""

from __future__ import annotations

import json

import pytest
import ray
from reference import generate_in_background, hf_generate

from experts.placement import PlacementConfig
from experts.plan import stats_json
from router_service.engine import SwitchCluster

pytestmark = pytest.mark.slow

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1], [88, 1]]
MAX_NEW = 8


def test_planned_over_two_gpu_nodes_with_replicas(multi_node_cluster, checkpoint_factory, tmp_path):
    _, workers = multi_node_cluster
    path, hf_model = checkpoint_factory("multinode", num_experts=8, expert_capacity=64)
    reference = hf_generate(hf_model, PROMPTS, MAX_NEW)

    # A first run counts the tokens per expert; the second is planned by those counts, hot experts replicated.
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=4, nodes=2)) as model:
        assert [o.token_ids for o in model.generate(PROMPTS, max_new_tokens=MAX_NEW)] == [t for t, _ in reference]
        counts = model.expert_token_counts()
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(stats_json(counts)))
    hottest = max(((stack, layer, e) for (stack, layer), tokens in counts.items() for e in range(8)),
                  key=lambda k: counts[k[:2]][k[2]])

    options = PlacementConfig(gpus=4, nodes=2, gpu_memory="1GiB", actors_per_gpu=2, replicate_hot=2,
                              stats=str(stats))
    with SwitchCluster(path, placement=options) as model:
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        infos = model.actor_info()
        counts_after = ray.get([a.token_counts.remote() for a in model.actors])
        specs = model.placement.actors

    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in reference]
    # Each planned node is its own worker node (the head has no GPU), and every actor runs where planned.
    node_of = {spec.node: set() for spec in specs}
    for spec, info in zip(specs, infos):
        node_of[spec.node].add(info["node_id"])
    assert all(len(ids) == 1 for ids in node_of.values())
    assert {ids.pop() for ids in node_of.values()} == {w.node_id for w in workers}
    assert len(specs) == 8 and all(spec.gpus == 0.5 for spec in specs)
    check_each_planned_gpu_is_one_gpu(specs, infos)
    # The hottest expert has two copies, on different GPUs, and both computed some of its tokens.
    copies = [i for i, spec in enumerate(specs) if hottest in spec.experts]
    assert len(copies) == 2 and copies[0] // 2 != copies[1] // 2
    assert all(counts_after[i][hottest] > 0 for i in copies)


def check_each_planned_gpu_is_one_gpu(specs, infos) -> None:
    """The actors sharing a planned GPU run on one GPU of one node, and no two planned GPUs share one (as Ray
    assigned them: the GPUs of these nodes are Ray's resources alone). Fails where a node's GPUs are one bundle, whose
    fractions Ray gives out where they fit: the actors of two planned GPUs started together then mix."""
    gpu_of: dict[tuple[int, int], set] = {}
    for spec, info in zip(specs, infos):
        gpu_of.setdefault((spec.node, spec.gpu), set()).add((info["node_id"], tuple(info["gpu_ids"])))
    assert all(len(gpus) == 1 for gpus in gpu_of.values()), gpu_of
    assert len({gpus.pop() for gpus in gpu_of.values()}) == len(gpu_of), gpu_of


def test_losing_a_node(multi_node_cluster, checkpoint_factory):
    """A node with experts goes away mid-generation. With a spare node, its placement group bundle and actors
    come back there and every request completes unchanged. With no room left, requests decoding fail after the
    restart timeout with a clear message, new ones are refused saying whose actors wait for room, and the service
    recovers when a node returns."""
    import time

    from router_service.dispatch import ExpertsUnavailable

    cluster, workers = multi_node_cluster
    path, hf_model = checkpoint_factory("multinode", num_experts=8, expert_capacity=64)
    prompts = PROMPTS * 2
    reference = [tokens for tokens, _ in hf_generate(hf_model, prompts, 30)]
    spare = cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=200 * 2**20)
    cluster.wait_for_nodes()
    # Time enough for the lost node's four actors to start again on the spare, beside the rest, on 2 cores.
    options = PlacementConfig(gpus=4, nodes=2, gpu_memory="1GiB", actors_per_gpu=2, restart_timeout_s=45)
    with SwitchCluster(path, placement=options) as model:
        fleet_node = ray.get(model.fleet.node_id.remote())
        assert fleet_node == ray.get_runtime_context().get_node_id()  # with the front, not on an expert node
        used = {info["node_id"] for info in model.actor_info()}
        lost = next(w for w in workers if w.node_id in used)
        thread, result = generate_in_background(model, prompts, max_new_tokens=30)
        cluster.remove_node(lost)
        thread.join(120)
        assert "error" not in result, result.get("error")
        assert [o.token_ids for o in result["outputs"]] == reference
        infos = model.actor_info()
        now_on = {info["node_id"] for info in infos}
        assert lost.node_id not in now_on and spare.node_id in now_on
        check_each_planned_gpu_is_one_gpu(model.placement.actors, infos)  # the lost node's actors restarted together

        # No room now: the requests decoding fail after the restart timeout, naming the actors that are down; the
        # front says whose actors wait for room, and takes no new request (a served one is refused at once).
        thread, result = generate_in_background(model, prompts, max_new_tokens=30)
        cluster.remove_node(next(w for w in [*workers, spare] if w is not lost and w.node_id in now_on))
        started = time.monotonic()
        thread.join(90)
        assert isinstance(result.get("error"), ExpertsUnavailable) and "within 45 s" in str(result["error"])
        assert time.monotonic() - started < 90
        while "of 2 wait for room on another node" not in model.link.status:
            assert not model.experts_ready and time.monotonic() - started < 100, model.link.status
            time.sleep(0.1)
        with pytest.raises(ExpertsUnavailable, match="of 2 wait for room on another node"):
            model.check_experts()  # as a served request is (the Python API's waits restart_timeout_s first)
        # A node comes back: the actors restart there and the same model serves again.
        cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=200 * 2**20)
        cluster.wait_for_nodes()
        model.check_experts(120.0)  # restarted on the new node, and taken up again
        assert [o.token_ids for o in model.generate(prompts, max_new_tokens=30)] == reference
