"""Which actor hosts which expert: packed, or planned over GPUs and nodes."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from pydantic import ValidationError
from reference import MODEL_CONFIGS

from cluster.testing import tiny_config
from experts.checkpoint import read_config
from experts.fleet import bundles
from experts.placement import Placement, PlacementConfig, experts_per_cpu
from experts.spec import sparse_layers


def all_experts(config):
    return sorted((s, i, e) for s in ("encoder", "decoder") for i in sparse_layers(config, s)
                  for e in range(config.num_experts))


@pytest.mark.parametrize("per_actor, actors", [(1, 8), (3, 3), (8, 1), (20, 1)])
def test_packed_placement_places_every_expert_once(per_actor, actors):
    config = tiny_config(num_experts=8)
    placement = Placement.packed(config, per_actor)
    assert len(placement.actors) == actors
    assert sorted(key for spec in placement.actors for key in spec.experts) == all_experts(config)
    owners = placement.owners()
    assert set(owners) == {(s, i) for s, i, _ in all_experts(config)}
    # An actor hosts the same expert indices in every sparse layer.
    for table in owners.values():
        assert [table[e] for e in range(8)] == [[e // per_actor] for e in range(8)]


def test_packed_placement_splits_actors_evenly_over_nodes():
    placement = Placement.packed(tiny_config(num_experts=8), 2, nodes=2)
    assert [spec.node for spec in placement.actors] == [0, 0, 1, 1]
    assert bundles(placement, 0.5, {}) == [[{"CPU": 1.0}], [{"CPU": 1.0}]]
    with pytest.raises(ValueError, match="nodes"):
        Placement.packed(tiny_config(num_experts=8), 8, nodes=2)


def test_default_packing_is_one_actor_per_cpu_and_at_least_one_per_node():
    assert experts_per_cpu(8, cpus=2) == 4 and experts_per_cpu(8, cpus=3) == 3 and experts_per_cpu(8, cpus=64) == 1
    assert experts_per_cpu(8, cpus=6, nodes=5) == 1  # 2 per actor would leave a node without an actor
    # As many actors as nodes, each as many experts but the last, which takes the rest: 128 over 3 nodes as 43, 43
    # and 42 (not 42, 42, 42 and a fourth actor of 2 beside the first on node 0), 2048 as 683, 683 and 682.
    for experts, nodes, cpus in ((128, 3, 3), (2048, 3, 1), (8, 3, 3), (128, 6, 6)):
        placement = Placement.packed(tiny_config(num_experts=experts), experts_per_cpu(experts, cpus, nodes), nodes)
        per_node = [sum(key[:2] == ("encoder", 1) for a in placement.actors if a.node == n for key in a.experts)
                    for n in range(nodes)]  # one layer's experts on each node
        per_actor = -(-experts // nodes)
        assert per_node == [per_actor] * (nodes - 1) + [experts - per_actor * (nodes - 1)], (experts, nodes, per_node)
    placement = PlacementConfig(cpus=2).place(tiny_config(num_experts=8), "fp32")
    assert len(placement.actors) == 2


def test_experts_per_actor_must_be_positive():
    with pytest.raises(ValueError, match="experts_per_actor"):
        Placement.packed(tiny_config(), 0)


def test_planned_placement_follows_the_plan(tmp_path):
    """Every expert on the GPU the planner chose, hot ones twice on different GPUs, GPUs shared as asked: the actors
    of each GPU ask for their fractions of one bundle of their node's placement group, that GPU's. Fails if two
    GPUs' actors share a bundle (Ray gives fractions of a bundle of several GPUs out where they fit, and mixes
    them)."""
    config = tiny_config(num_experts=8)
    expert_mib = 2 * config.d_model * config.d_ff * 4 / 2**20
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"encoder.1": [9, 8, 7, 1, 1, 1, 1, 1]}))
    options = PlacementConfig(gpus=4, nodes=2, gpu_memory=f"{expert_mib * 12}MiB", replicate_hot=3, stats=str(stats),
                              actors_per_gpu=2, actor_resources={"expert_slot": 1})
    placement = options.place(config, "fp32")
    assert placement.nodes == 2 and len(placement.actors) == 8
    assert all(spec.gpus == 0.5 for spec in placement.actors)
    hosted = Counter(key for spec in placement.actors for key in spec.experts)
    assert sorted(hosted) == all_experts(config)
    assert sorted(hosted.values()) == [1] * (len(hosted) - 3) + [2, 2, 2]
    for key in (k for k, n in hosted.items() if n == 2):
        gpus = [i // 2 for i, spec in enumerate(placement.actors) if key in spec.experts]
        assert gpus[0] != gpus[1]
    assert [(spec.node, spec.gpu) for spec in placement.actors] == [(n, g) for n in (0, 1) for g in (0, 0, 1, 1)]
    assert bundles(placement, 0.25, options.actor_resources) == [[{"CPU": 0.5, "GPU": 1.0, "expert_slot": 2.0}] * 2] * 2


@pytest.mark.parametrize("per_gpu", [3, 6, 7, 15])
def test_actors_sharing_a_gpu_ask_for_no_more_than_it(per_gpu):
    """Ray counts a GPU in ten-thousandths: six actors of 1/6 rounded to the nearest would ask for 1.0002 GPUs, and a
    bundle of that never fits a node. Fails if the shares or the bundles round up."""
    config = tiny_config(num_experts=16)
    placement = PlacementConfig(gpus=2, nodes=1, actors_per_gpu=per_gpu).place(config, "fp32")
    sharing = len(placement.actors) // 2  # actors on each GPU (per_gpu, or fewer for 32 experts a GPU)
    for spec in placement.actors:  # as Ray counts it: whole ten-thousandths, at most a GPU between them
        assert abs(spec.gpus * 10_000 - round(spec.gpus * 10_000)) < 1e-6 and sharing * spec.gpus <= 1
    assert [bundle["GPU"] for bundle in bundles(placement, 0.1, {})[0]] == [1.0, 1.0]


@pytest.mark.parametrize("options, message", [
    ({"replicate_hot": 2}, "replicate_hot needs gpus"), ({"actors_per_gpu": 4}, "actors_per_gpu needs gpus"),
    ({"gpu_memory": "40GiB"}, "gpu_memory needs gpus"), ({"stats": "stats.json"}, "stats needs gpus"),
    ({"gpus": 2, "experts_per_actor": 3}, "experts_per_actor: packs CPU actors"),
    ({"gpus": 2, "cpus": 5}, "cpus: packs CPU actors"),
    ({"gpus": 2, "gpu_memory": "80.0.0GiB"}, "gpu_memory: cannot read '80.0.0GiB'"),
])
def test_an_option_the_way_of_placing_does_not_read_is_refused(options, message):
    """The planner's options need GPUs, and the packing's are ignored with them: refused, naming the option,
    rather than silently ignored."""
    with pytest.raises(ValidationError, match=message):
        PlacementConfig(**options)
    assert PlacementConfig(gpus=2, gpu_memory="40GiB", actors_per_gpu=2, replicate_hot=1).gpus == 2
    assert PlacementConfig(experts_per_actor=3, gpu_memory="80GiB", actors_per_gpu=1).experts_per_actor == 3


def test_gpus_the_plan_leaves_empty_get_no_actors():
    """Two experts a layer over 64 GPUs: the plan fills a few GPUs and leaves the rest empty. Each expert gets one
    actor on the GPU it was planned on, and no actor goes to an empty GPU (asking Ray for a GPU to host nothing).
    Fails if the empty GPUs get actors, or crash the placement."""
    config = tiny_config(num_experts=2)
    placement = PlacementConfig(gpus=64).place(config, "fp32")
    assert all(spec.experts for spec in placement.actors)
    assert sorted(key for spec in placement.actors for key in spec.experts) == all_experts(config)
    assert len(placement.actors) <= len(all_experts(config)) < 64



@pytest.mark.parametrize("gpus, per_gpu, sizes", [(24, 3, [1, 1, 2] * 24),
                                                  (10, 4, [2, 3, 2, 3] * 6 + [2, 2, 2, 3] * 4)])
def test_a_gpu_is_shared_by_as_many_actors_as_asked(gpus, per_gpu, sizes):
    """`actors_per_gpu` actors on each GPU, its experts shared out as evenly as can be: switch-base-8's 96 experts on
    24 GPUs (4 each), 3 actors of 1, 1 and 2; on 10 GPUs (10 or 9 each), 4 actors of 2 or 3. Fails if fewer actors are
    made (48 of 72 were) or one is left with far fewer experts than the others (3, 3, 3 and 1 were)."""
    config = read_config(MODEL_CONFIGS / "switch-base-8.json")
    placement = PlacementConfig(gpus=gpus, actors_per_gpu=per_gpu).place(config, "bf16")
    assert len(placement.actors) == gpus * per_gpu
    assert sorted(len(spec.experts) for spec in placement.actors) == sorted(sizes)
    assert all(spec.gpus == math.floor(10_000 / per_gpu) / 10_000 for spec in placement.actors)


def test_the_fleet_sees_a_placement_without_the_fronts_own_settings():
    """A change to what only the fronts read (how long they wait for room, or for a restarting actor) leaves the
    fleet's view, and so the fleet and the experts it loaded, as they were; any other field changes it."""
    assert PlacementConfig(timeout_s=5, restart_timeout_s=7).for_fleet() == PlacementConfig().for_fleet()
    assert PlacementConfig(experts_per_actor=2).for_fleet() != PlacementConfig().for_fleet()


def test_a_gpu_with_fewer_experts_than_actors_asked_gets_one_actor_an_expert():
    """No actor without experts: each would still ask for a share of the GPU and a process. Fails if a lightly
    filled GPU gets as many actors as asked."""
    from experts.plan import GpuPlan, Plan

    full, light = GpuPlan(0, 0, [("encoder", 1, e) for e in range(3)]), GpuPlan(1, 0, [("encoder", 1, 3)])
    plan = Plan([full, light], expert_bytes=1, front_bytes=1, budget_bytes=1, min_gpus=2, replicas={}, warnings=[])
    placement = Placement.from_plan(plan, actors_per_gpu=2)
    assert [(len(a.experts), a.gpus) for a in placement.actors] == [(2, 0.5), (1, 0.5), (1, 1.0)]


@pytest.mark.parametrize("gpus, per_gpu", [(1, 2), (2, 3), (5, 4)])
def test_the_actors_sharing_a_gpu_each_take_a_part_of_every_layer_it_holds(gpus, per_gpu):
    """A sparse layer's tokens go to every actor holding some of its experts at once: actors that each held whole
    layers would compute one at a time, the others idle. Each actor's part of a layer is a run of the GPU's experts
    of it. Fails if the GPU's experts are cut into runs of whole layers."""
    config = read_config(MODEL_CONFIGS / "switch-base-8.json")
    placement = PlacementConfig(gpus=gpus, actors_per_gpu=per_gpu).place(config, "bf16")
    for gpu_first in range(0, len(placement.actors), per_gpu):
        sharing = placement.actors[gpu_first:gpu_first + per_gpu]
        layers = {key[:2] for spec in sharing for key in spec.experts}
        for layer in layers:
            parts = [sorted(e for (*at, e) in spec.experts if tuple(at) == layer) for spec in sharing]
            held = sorted(e for part in parts for e in part)  # the GPU's experts of the layer
            assert sum(bool(part) for part in parts) == min(per_gpu, len(held)), (layer, parts)
            for part in (part for part in parts if part):
                first = held.index(part[0])
                assert part == held[first:first + len(part)], (layer, parts)
