"""`routing=True` (gRPC and HTTP `return_routing`): where each sparse layer sent each position equals what
transformers' own routers did in its generate, dropped tokens included."""

from __future__ import annotations

import pytest
from reference import hf_generate, hf_routing

from experts.placement import PlacementConfig
from router_service.engine import SwitchCluster

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1], [88, 1]]
MAX_NEW = 8
# Capacity 2 drops encoder tokens; sparse layers in both stacks at different steps; 16 experts.
CONFIG = dict(num_experts=16, num_layers=4, num_sparse_encoder_layers=2, num_decoder_layers=3,
              num_sparse_decoder_layers=3, expert_capacity=2, router_bias=True)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("routing", **CONFIG)


def test_routes_equal_transformers_routers(ray_cluster, checkpoint):
    path, hf_model = checkpoint
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=8)) as model:
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW, routing=True)
        plain = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
    reference = hf_routing(hf_model, PROMPTS, MAX_NEW)
    assert [o.token_ids for o in outputs] == [t for t, _ in hf_generate(hf_model, PROMPTS, MAX_NEW)]
    assert [o.token_ids for o in plain] == [o.token_ids for o in outputs] and not plain[0].routes
    dropped = 0
    for out, expected in zip(outputs, reference, strict=True):
        assert list(out.routes) == sorted(expected, key=lambda k: (k[0] != "encoder", k[1]))  # encoder first
        for key, (experts, probs, was_dropped) in expected.items():
            route = out.routes[key]
            assert route.experts == experts and route.dropped == was_dropped, key
            assert route.probs == pytest.approx(probs, abs=1e-5), key
        dropped += sum(sum(r.dropped) for r in out.routes.values())
        assert sum(sum(r.dropped) for r in out.routes.values()) == out.dropped_tokens
    assert dropped > 0  # the capacity did drop tokens, so `dropped` was tested both ways
    routed = out.to_dict()["routing"]
    assert [(r["stack"], r["layer"]) for r in routed] == list(out.routes)
    assert all(len(r["experts"]) == (len(out.prompt) if r["stack"] == "encoder" else len(out.token_ids))
               for r in routed)
