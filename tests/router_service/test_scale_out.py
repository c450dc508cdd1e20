"""Scale-out on one machine: a switch-c-2048 look-alike planned and served packed, and serving in another
dtype."""

from __future__ import annotations

import copy
import logging

import pytest
from reference import edit_config, hf_generate

from cluster.testing import tiny_config, write_random_checkpoint
from experts.checkpoint import SwitchCheckpoint
from experts.ffn import unpacked
from experts.placement import PlacementConfig
from experts.plan import make_plan
from experts.spec import expert_bytes
from experts.wire import torch_dtype
from router_service import engine
from router_service.engine import SwitchCluster

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [7, 3, 1], [14, 15, 16, 50, 27, 1]]


@pytest.mark.slow
def test_switch_c_2048_look_alike(ray_cluster, tmp_path, caplog):
    """switch-c-2048's structure (15 encoder and 15 decoder blocks, all sparse, 2048 experts each: 61,440
    experts) at tiny widths, with its published config.json, which says 12 decoder layers."""
    config = tiny_config(vocab_size=64, d_model=8, d_kv=4, num_heads=2, d_ff=8, num_experts=2048, num_layers=15,
                         num_sparse_encoder_layers=15, num_decoder_layers=15, num_sparse_decoder_layers=15)
    hf_model = write_random_checkpoint(tmp_path, config)
    edit_config(tmp_path, num_decoder_layers=12, decoder_sparse_step=0)
    with caplog.at_level(logging.WARNING, logger="experts.checkpoint"):
        checkpoint = SwitchCheckpoint.open(tmp_path)
    assert "the weights hold 15 blocks, 15 sparse; following the weights" in caplog.text
    assert checkpoint.config.num_decoder_layers == 15

    plan = make_plan(checkpoint.config, gpus=48, gpu_memory="80GiB" and 2**20, dtype="bf16")
    placed = [key for gpu in plan.gpus for key in gpu.experts]
    assert len(placed) == len(set(placed)) == 30 * 2048

    with SwitchCluster(tmp_path, placement=PlacementConfig(experts_per_actor=512)) as model:
        assert len(model.actors) == 4
        outputs = model.generate(PROMPTS, max_new_tokens=6)
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in hf_generate(hf_model, PROMPTS, 6)]


@pytest.mark.parametrize("local_experts", [False, True], ids=["actors", "front"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_serving_in_half_precision(ray_cluster, checkpoint_factory, dtype, local_experts):
    """A float32 checkpoint served in bfloat16 or float16 follows transformers' model cast to the same dtype, token
    for token: the front does transformers' operations in the same order, with the same casts (float32 router
    and softmax, float16 clamping). The experts computed by their actors, or by the front from its own copy in that
    dtype."""
    path, hf_model = checkpoint_factory("relu-tied-step1-2-bf16", num_experts=4, expert_capacity=64)
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=2), dtype=dtype,
                       local_experts=local_experts) as model:
        assert model.front.dtype == torch_dtype(dtype)
        assert {info["device"] for info in model.actor_info()} == {"cpu"}
        outputs = model.generate(PROMPTS, max_new_tokens=6)
        dispatcher = model.dispatcher
        assert (dispatcher.local_calls > 0) == local_experts and (dispatcher.calls > 0) != local_experts
        held = [unpacked(w) for pair in dispatcher.local.values() for w in pair]
        assert bool(held) == local_experts and all(w.dtype == torch_dtype(dtype) for w in held)
    assert_follows_transformers_in(dtype, outputs, hf_model)


def assert_follows_transformers_in(dtype: str, outputs, hf_model) -> None:
    """The same tokens as transformers' model cast to `dtype`, log-probabilities within 1e-3."""
    # A copy: casting the shared model to half precision and back would round its weights for later tests.
    reference = hf_generate(copy.deepcopy(hf_model).to(torch_dtype(dtype)), PROMPTS, 6)
    for out, (tokens, logprobs) in zip(outputs, reference, strict=True):
        assert out.token_ids == tokens
        assert out.logprobs == pytest.approx(logprobs, abs=1e-3)


def test_a_front_short_of_memory_copies_what_fits_and_leaves_the_rest_to_the_actors(ray_cluster, checkpoint_factory,
                                                                                    monkeypatch):
    """Served in bfloat16 from float32, each expert the front computes is a copy of its own, cast and packed: on a node
    with room for three beside the reserve it copies three, and their actors compute the others. The tokens are those
    of the front computing every one. Fails if the room is not checked, or counted without the packed copy."""
    path, hf_model = checkpoint_factory("relu-tied-step1-2-bf16", num_experts=4, expert_capacity=64)
    each = 2 * expert_bytes(SwitchCheckpoint.open(path).config, "bf16")  # the cast copy, and the packed one
    total = 1000 * each
    monkeypatch.setattr(engine, "host_memory", lambda: (int(engine.HOST_RESERVE * total) + 3 * each + each // 2, total))
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=2), dtype="bf16") as model:
        outputs = model.generate(PROMPTS, max_new_tokens=6)
        dispatcher = model.dispatcher
        assert len(dispatcher.local) == 3 and dispatcher.local_calls > 0 and dispatcher.calls > 0
    assert_follows_transformers_in("bf16", outputs, hf_model)
