"""The trained demo checkpoint in the repo answers its tasks right, through the expert actors."""

from __future__ import annotations

from cluster.demo import DEMO_MODEL, PROMPTS, STREAMED, expected_answer, spell
from experts.placement import PlacementConfig
from router_service.engine import SwitchCluster


def test_expected_answers():
    assert [spell(n) for n in (0, 7, 13, 40, 42, 100, 472, 999)] == [
        "zero", "seven", "thirteen", "forty", "forty two", "one hundred", "four hundred seventy two",
        "nine hundred ninety nine"]
    assert expected_answer("reverse : 3 1 4") == "4 1 3" and expected_answer("sort : 3 1 4") == "1 3 4"


def test_demo_model_answers_its_prompts(ray_cluster):
    prompts = PROMPTS + [STREAMED]
    # Every expert computed by its actor: by default a front computes those of the actors on its node itself.
    with SwitchCluster(DEMO_MODEL, placement=PlacementConfig(experts_per_actor=4), local_experts=False) as model:
        outputs = model.generate(texts=prompts, max_new_tokens=12)
        answers = [model.decode(o.token_ids) for o in outputs]
        assert model.dispatcher.calls > 0
    assert answers == [expected_answer(p) for p in prompts]
    assert all(o.finish_reason == "eos" and o.dropped_tokens == 0 for o in outputs)
