"""The CUDA path against transformers on the same GPU, in float32 and bfloat16: the front and the experts' own FFN
in one process (no Ray needed), and the served engine with its expert actors on the GPU. Skipped without CUDA;
`make gpu-check` runs them."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import LocalExperts, dequantized_model, hf_generate

from experts.checkpoint import SwitchCheckpoint
from experts.held import held_experts
from experts.placement import PlacementConfig
from experts.spec import STACKS, expert_tensor_names, sparse_layers
from experts.wire import torch_dtype
from router_service.batching import ContinuousBatcher, Sequence, run_to_completion
from router_service.model import SwitchFront
from router_service.requests import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1], [88, 1]]
MAX_NEW = 10
CONFIG = dict(num_experts=8, expert_capacity=4, num_layers=4, num_sparse_encoder_layers=2, num_decoder_layers=4,
              num_sparse_decoder_layers=2, dense_act_fn="gelu_new", router_bias=True)
# float32 must match as on the CPU. bfloat16 rounds the same operations, but cuBLAS picks its kernels (and so its
# rounding) by the shape of each product, and the batches here are not transformers' padded ones.
LOGPROB_TOLERANCE = {"fp32": 1e-4, "bf16": 0.05}


def reference(hf_model, dtype: str):
    # A copy: casting the shared model to bfloat16 and back would round its weights for later tests.
    return hf_generate(copy.deepcopy(hf_model).to("cuda", torch_dtype(dtype)), PROMPTS, MAX_NEW, distributions=True)


def assert_same(token_ids: list[list[int]], logprobs: list[list[float]], expected, dtype: str) -> None:
    """float32: the same tokens, logprobs within the tolerance. bfloat16: the same up to a step where our token is
    within the tolerance of transformers' best in transformers' own distribution (a near-tie, which rounding decides
    either way), and our log-probability of our token within the tolerance of transformers'; the sequences may part
    after it."""
    tolerance = LOGPROB_TOLERANCE[dtype]
    for ours, got, (tokens, want, steps) in zip(token_ids, logprobs, expected, strict=True):
        if dtype == "fp32":
            assert ours == tokens
        n = next((i for i, (a, b) in enumerate(zip(ours, tokens)) if a != b), min(len(ours), len(tokens)))
        assert got[:n] == pytest.approx(want[:n], abs=tolerance)
        if n < min(len(ours), len(tokens)):
            theirs_of_ours = float(steps[n, ours[n]])  # transformers' log-probability of our token
            assert theirs_of_ours >= want[n] - tolerance, (
                f"step {n}: token {ours[n]} is not a near-tie of transformers' {tokens[n]}")
            assert got[n] == pytest.approx(theirs_of_ours, abs=tolerance)
        else:
            assert ours == tokens


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_front_and_expert_ffn_on_cuda(checkpoint_factory, dtype):
    path, hf_model = checkpoint_factory("cuda", **CONFIG)
    checkpoint = SwitchCheckpoint.open(path)
    front = SwitchFront(checkpoint, LocalExperts(checkpoint, "cuda", torch_dtype(dtype)), dtype=torch_dtype(dtype),
                        device="cuda")
    sequences = [Sequence(p, SamplingParams(max_new_tokens=MAX_NEW)) for p in PROMPTS]
    run_to_completion(ContinuousBatcher(front, max_sequences=8), sequences)
    assert_same([s.token_ids for s in sequences], [s.logprobs for s in sequences], reference(hf_model, dtype), dtype)


def test_a_front_on_the_gpu_holds_each_layer_of_all_its_experts_stacked(checkpoint_factory):
    """A layer whose every expert the front computes is one stacked tensor of each weight on the GPU, and each
    expert's weights are views of it (no second copy); the experts of a layer held in part are held one by one."""
    path, _ = checkpoint_factory("cuda", **CONFIG)
    checkpoint = SwitchCheckpoint.open(path)
    experts = checkpoint.config.num_experts
    full = ("decoder", sparse_layers(checkpoint.config, "decoder")[0])
    part = ("encoder", sparse_layers(checkpoint.config, "encoder")[0])
    weights, stacks = held_experts(checkpoint, [*((*full, e) for e in range(experts)), (*part, 1)], "none",
                                   device="cuda", dtype=torch.bfloat16)
    assert list(stacks) == [full] and set(weights) == {*((*full, e) for e in range(experts)), (*part, 1)}
    for key, (wi, wo) in weights.items():
        names = expert_tensor_names(*key)
        for held, tensor in zip((wi, wo), checkpoint.read(list(names)).values()):
            assert held.device.type == "cuda" and torch.equal(held.cpu(), tensor.to(torch.bfloat16))
        if key[:2] == full:
            assert wi.data_ptr() == stacks[full][0][key[2]].data_ptr()
            assert wo.data_ptr() == stacks[full][1][key[2]].data_ptr()


@pytest.mark.ray
@pytest.mark.parametrize("local_experts", [False, True], ids=["actors", "front"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_engine_with_expert_actors_on_the_gpu(checkpoint_factory, dtype, local_experts, request):
    """The actors share the front's one GPU: with local_experts the front computes their experts from its own copy
    there and calls no actor; without, every expert's tokens go to its actor."""
    pytest.importorskip("ray", reason="Ray is not installed here")
    request.getfixturevalue("ray_cluster")
    from router_service.engine import SwitchCluster  # imports Ray, which the other test here does without

    path, hf_model = checkpoint_factory("cuda", **CONFIG)
    with SwitchCluster(path, placement=PlacementConfig(gpus=1, gpu_memory="2GiB", actors_per_gpu=2),
                       dtype=dtype, local_experts=local_experts) as model:
        assert model.front.device.type == "cuda"
        assert {info["device"] for info in model.actor_info()} == {"cuda"}
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        dispatcher = model.dispatcher
        assert (dispatcher.local_calls > 0) == local_experts and (dispatcher.calls > 0) != local_experts
        hosted = {key for actor in model.placement.actors for key in actor.experts}
        assert set(dispatcher.local) == (hosted if local_experts else set())
        assert all(w.device.type == "cuda" and w.dtype == torch_dtype(dtype)
                   for pair in dispatcher.local.values() for w in pair)
        config = model.checkpoint.config
        layers = {(stack, layer) for stack in STACKS for layer in sparse_layers(config, stack)}
        assert set(dispatcher.stacks) == (layers if local_experts else set())  # every expert on the front's GPU
        # Each decoding step feeds one position of each sequence through every sparse decoder layer (the start
        # token, then each generated token but the last); those computed stacked are counted once the step is done.
        fed = sum(len(o.token_ids) for o in outputs)
        assert [sum(n) for (stack, _), n in model.expert_token_counts().items() if stack == "decoder"] == \
            [fed] * len(sparse_layers(config, "decoder"))
    assert_same([o.token_ids for o in outputs], [o.logprobs for o in outputs], reference(hf_model, dtype), dtype)


@pytest.mark.ray
@pytest.mark.parametrize("local_experts", [False, True], ids=["in-actors", "on-front"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_int8_experts_on_the_gpu(checkpoint_factory, dtype, local_experts, request):
    """int8 experts on CUDA (their values cast for each call, the products scaled after), computed by their actors
    or by the front from its own int8 copy: transformers with the dequantized expert weights, on the same GPU in the
    same dtype, gives the same tokens."""
    pytest.importorskip("ray", reason="Ray is not installed here")
    request.getfixturevalue("ray_cluster")
    from router_service.engine import SwitchCluster

    path, hf_model = checkpoint_factory("cuda", **CONFIG)
    with SwitchCluster(path, placement=PlacementConfig(gpus=1, gpu_memory="2GiB", actors_per_gpu=2),
                       dtype=dtype, quantize="int8", local_experts=local_experts) as model:
        assert {info["device"] for info in model.actor_info()} == {"cuda"}
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        dispatcher = model.dispatcher
        assert (dispatcher.local_calls > 0) == local_experts and (dispatcher.calls > 0) != local_experts
    assert_same([o.token_ids for o in outputs], [o.logprobs for o in outputs],
                reference(dequantized_model(hf_model), dtype), dtype)
