"""Experts spread over several Ray nodes by the planner, through a placement group, with replicas of the
busiest experts; outputs still equal transformers'."""

from __future__ import annotations

import json

import ray

from cluster.engine import SwitchCluster
from cluster.placement import PlacementConfig
from cluster.plan import stats_json
from reference import hf_generate

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
    # The hottest expert has two copies, on different GPUs, and both computed some of its tokens.
    copies = [i for i, spec in enumerate(specs) if hottest in spec.experts]
    assert len(copies) == 2 and copies[0] // 2 != copies[1] // 2
    assert all(counts_after[i][hottest] > 0 for i in copies)
