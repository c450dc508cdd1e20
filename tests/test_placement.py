from __future__ import annotations

import pytest

from cluster.checkpoint import sparse_layers
from cluster.placement import Placement
from cluster.synthetic import tiny_config


@pytest.mark.parametrize("per_actor, actors", [(1, 8), (3, 3), (8, 1), (20, 1)])
def test_packed_placement_places_every_expert_once(per_actor, actors):
    config = tiny_config(num_experts=8)
    placement = Placement.packed(config, per_actor)
    assert len(placement.actors) == actors
    hosted = [key for keys in placement.actors for key in keys]
    layers = [(s, i) for s in ("encoder", "decoder") for i in sparse_layers(config, s)]
    assert sorted(hosted) == sorted((s, i, e) for s, i in layers for e in range(8))
    owners = placement.owners()
    assert set(owners) == set(layers)
    # An actor hosts the same expert indices in every sparse layer.
    for layer in layers:
        assert [owners[layer][e] for e in range(8)] == [e // per_actor for e in range(8)]


def test_experts_per_actor_must_be_positive():
    with pytest.raises(ValueError, match="experts_per_actor"):
        Placement.packed(tiny_config(), 0)
