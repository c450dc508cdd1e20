"""Losing expert actors: a restarted actor costs a retry, not a request; one gone for good fails the requests
in its batch (UNAVAILABLE when served) instead of hanging them."""

from __future__ import annotations

import time

import ray
from reference import generate_in_background, hf_generate

from experts.placement import PlacementConfig
from router_service.engine import SwitchCluster

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1], [88, 1], [40, 41, 1],
           [12, 13, 14, 15, 1]]
MAX_NEW = 40


def test_killed_expert_actor_restarts_and_every_request_completes_unchanged(ray_cluster, checkpoint_factory):
    path, hf_model = checkpoint_factory("reliability", num_experts=8, expert_capacity=64, num_decoder_layers=6,
                                        num_sparse_decoder_layers=3)
    reference = hf_generate(hf_model, PROMPTS, MAX_NEW)
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=2)) as model:
        victim = model.actors[1]
        pid_before = ray.get(victim.info.remote())["pid"]
        thread, result = generate_in_background(model, PROMPTS, max_new_tokens=MAX_NEW)
        ray.kill(victim, no_restart=False)  # as if its process crashed mid-batch
        thread.join(120)
        assert "error" not in result, result.get("error")
        assert ray.get(victim.info.remote())["pid"] != pid_before  # it was restarted
    assert [o.token_ids for o in result["outputs"]] == [tokens for tokens, _ in reference]
    assert [len(o.token_ids) for o in result["outputs"]] == [len(t) for t, _ in reference]


def test_actor_gone_for_good_fails_its_requests_at_once(ray_cluster, checkpoint_factory):
    path, _ = checkpoint_factory("reliability", num_experts=8, expert_capacity=64, num_decoder_layers=6,
                                 num_sparse_decoder_layers=3)
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=2)) as model:
        thread, result = generate_in_background(model, PROMPTS, max_new_tokens=MAX_NEW)
        started = time.monotonic()
        ray.kill(model.actors[0], no_restart=True)
        thread.join(60)
        assert time.monotonic() - started < 30
    assert isinstance(result.get("error"), ray.exceptions.RayActorError)
