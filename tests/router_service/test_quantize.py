"""int8 experts (`quantize="int8"`): generation equals transformers' own generate on the same checkpoint with every
expert weight replaced by its int8 dequantized values, through the actors and computed by the front; the actors
hold a quarter of float32's bytes."""

from __future__ import annotations

import pytest
from reference import dequantized_model, hf_generate

from experts import int8
from experts.placement import PlacementConfig
from experts.wire import torch_dtype
from router_service.engine import SwitchCluster

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1], [88, 1]]
MAX_NEW = 10
CONFIG = dict(num_experts=4, num_layers=3, num_sparse_encoder_layers=3, num_decoder_layers=4,
              num_sparse_decoder_layers=2, dense_act_fn="gelu_new", router_bias=True, tie_word_embeddings=False,
              expert_capacity=64)
# The CPU's packed int8 kernel takes its activations in bfloat16 (experts.int8): log-probabilities move by that
# rounding (up to 0.008 here), less than by the quantization itself (0.03).
LOGPROB_TOLERANCE = 1.5e-2
# Served in bfloat16 or float16, against transformers in that dtype: its rounding of the dequantized weights too.
HALF_PRECISION_TOLERANCE = 0.1


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    """(folder, transformers' generate with the int8 experts' values, and with float32's)."""
    path, hf_model = checkpoint_factory("int8", **CONFIG)
    return path, hf_generate(dequantized_model(hf_model), PROMPTS, MAX_NEW), hf_generate(hf_model, PROMPTS, MAX_NEW)


def largest_difference(outputs, reference) -> float:
    return max(abs(a - b) for out, (_, logprobs) in zip(outputs, reference) for a, b in zip(out.logprobs, logprobs))


@pytest.mark.parametrize("local_experts", [False, True], ids=["actors", "front"])
def test_int8_experts_match_transformers_with_dequantized_experts(ray_cluster, checkpoint, local_experts):
    path, reference, float32 = checkpoint
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=2), quantize="int8",
                       local_experts=local_experts) as model:
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        infos = model.actor_info()
        dispatcher = model.dispatcher
        assert (dispatcher.local_calls > 0) == local_experts and (dispatcher.calls > 0) != local_experts
        held = [w for pair in dispatcher.local.values() for w in pair]
        assert all(isinstance(w, int8.Int8Weight) for w in held) and len(held) == 2 * len(dispatcher.local)
    for out, (tokens, logprobs) in zip(outputs, reference, strict=True):
        assert out.token_ids == tokens
        assert out.logprobs == pytest.approx(logprobs, abs=LOGPROB_TOLERANCE)
    # Nearer the quantized reference than float32's: fails if the experts computed with unquantized weights.
    assert 2 * largest_difference(outputs, reference) < largest_difference(outputs, float32)
    for info in infos:  # float32 checkpoint: int8 weights plus a float32 scale per output channel
        assert 0.25 < info["held_bytes"] / info["tensor_bytes"] <= 0.3


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_int8_experts_under_a_half_precision_front(ray_cluster, checkpoint_factory, dtype):
    """int8 experts served in bfloat16 or float16, held as int8 by the front and its actors: the tokens of
    transformers' model with the experts' dequantized values, cast to that dtype. (In these dtypes the rounding of
    the activations is as large as the quantization's: experts.test_int8 tells the two apart.)"""
    path, hf_model = checkpoint_factory("int8", **CONFIG)
    reference = hf_generate(dequantized_model(hf_model).to(torch_dtype(dtype)), PROMPTS, MAX_NEW)
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=2), quantize="int8", dtype=dtype) as model:
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        held = [w for pair in model.dispatcher.local.values() for w in pair]
        assert held and all(isinstance(w, int8.Int8Weight) for w in held)
        assert all(0.25 < info["held_bytes"] / info["tensor_bytes"] <= 0.3 for info in model.actor_info())
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in reference]
    for out, (_, logprobs) in zip(outputs, reference, strict=True):
        assert out.logprobs == pytest.approx(logprobs, abs=HALF_PRECISION_TOLERANCE)
