"""The front's own pieces of T5 math against transformers'."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from reference import LocalExperts
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersAttention,
    SwitchTransformersLayerNorm,
    eager_attention_forward,
)

from experts.checkpoint import SwitchCheckpoint
from router_service.dispatch import ExpertsUnavailable
from router_service.model import (
    Routing,
    SwitchFront,
    attention,
    clamp_fp16,
    length_groups,
    relative_position_bucket,
    rms_norm,
    run_overlapped,
)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 256)])
def test_relative_position_buckets_are_transformers(bidirectional, num_buckets, max_distance):
    distances = torch.arange(-600, 600)[None, :]
    ours = relative_position_bucket(distances, bidirectional, num_buckets, max_distance)
    theirs = SwitchTransformersAttention._relative_position_bucket(distances, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 768), (32, 1, 768), (300, 512)])
@pytest.mark.parametrize("scale", [3.0, 1e-3])  # the second small enough for epsilon to count
def test_rms_norm_is_transformers_bit_for_bit(dtype, shape, scale):
    torch.manual_seed(0)
    norm = SwitchTransformersLayerNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = (torch.randn(shape) * scale).to(dtype)
        assert torch.equal(rms_norm(x, norm.weight, 1e-6), norm(x))


def test_a_decoding_steps_position_bias_is_computed_for_its_width(checkpoint_factory):
    """The kept bias of a longer step, cut to a step's width, is the bias computed for that width: widths in an order
    that grows it, cuts it and grows it again."""
    path, _ = checkpoint_factory("tiny-position-bias", relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20)
    checkpoint = SwitchCheckpoint.open(path)
    front = SwitchFront(checkpoint, LocalExperts(checkpoint))
    for width in [1, 2, 3, 9, 4, 1, 17, 40, 5, 41, 39, 100]:
        computed = front._position_bias("decoder", torch.tensor([width - 1]), width)
        assert torch.equal(front._decoder_position_bias(width), computed), width


def test_float16_is_clamped_as_transformers_clamps_it_a_sequence_alone():
    """transformers' guard after each float16 sub-layer: values at most the float16 maximum, 1000 less where any
    value of the request overflowed to inf; here by sequence (rows of packed tokens, or a decoding step's one row
    each), so that a batch mate's overflow leaves a sequence's values as they are alone; other dtypes pass untouched.
    Fails if the clamp is left out, its margin lost, or taken over the whole batch."""
    top = torch.finfo(torch.float16).max
    tokens = torch.tensor([[float("inf"), 1.5], [-float("inf"), top], [top, 2.0], [-top, 3.0]], dtype=torch.float16)
    lower = top - 1000
    expected = torch.tensor([[lower, 1.5], [-lower, lower], [top, 2.0], [-top, 3.0]], dtype=torch.float16)
    assert torch.equal(clamp_fp16(tokens, torch.tensor([0, 0, 1, 1])), expected)  # two prompts of two tokens
    # A decoding step: [batch, 1, d_model], a row a sequence.
    steps = tokens[:, None, :]
    assert torch.equal(clamp_fp16(steps, torch.arange(4)), torch.tensor(
        [[lower, 1.5], [-lower, lower], [top, 2.0], [-top, 3.0]], dtype=torch.float16)[:, None, :])
    alone = clamp_fp16(tokens[2:], torch.tensor([0, 0]))
    assert torch.equal(alone, tokens[2:])
    wide = torch.tensor([[float("inf"), 3e38]])
    assert clamp_fp16(wide, torch.tensor([0])) is wide


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_is_transformers_bit_for_bit(dtype):
    """Our attention against transformers' own (the function SwitchTransformersAttention calls, unscaled) on the same
    projections and position bias, the mask in it."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 8).to(dtype) for _ in range(3))
    bias = torch.randn(1, 4, 7, 7).to(dtype)
    theirs, _ = eager_attention_forward(SimpleNamespace(training=False), q, k, v, None, scaling=1.0,
                                        position_bias=bias)
    assert torch.equal(attention(q, k, v, bias), theirs.reshape(3, 7, -1))


def test_routing_of_parts_joins_their_rows_layer_by_layer():
    def part(rows: int, offset: int) -> dict[int, Routing]:
        return {layer: Routing(torch.arange(rows)[:, None] + offset + layer, torch.full((rows, 1), 0.5 + layer),
                               torch.arange(rows)[:, None] % 2 == layer % 2) for layer in (1, 3)}

    joined = Routing.cat([part(2, 0), part(3, 10)])
    assert list(joined) == [1, 3]
    assert joined[3].expert.tolist() == [[3], [4], [13], [14], [15]]
    assert joined[1].prob.tolist() == [[1.5]] * 5 and joined[1].prob.dtype == torch.float32
    assert joined[3].dropped.tolist() == [[False], [True], [False], [True], [False]]
    assert joined[1].expert.shape == (5, 1)
    assert Routing.cat([{}, {}]) == {}  # a stack without sparse layers


def brute_force_cost(lengths: list[int], group_cost: int) -> int:
    """The least cost over every way to cut the sorted lengths into runs."""
    ordered, best = sorted(lengths), None
    for cuts in range(2 ** (len(ordered) - 1)):
        cost, start = 0, 0
        for end in range(1, len(ordered) + 1):
            if end == len(ordered) or cuts >> (end - 1) & 1:
                cost += ordered[end - 1] * (end - start) + group_cost
                start = end
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("lengths", [[5, 3, 100, 98, 7, 50, 52, 51], [10] * 6, [1], [128, 16, 17, 127, 64, 65, 3]])
def test_length_groups_pad_least(lengths):
    groups = length_groups(lengths, group_cost=32)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths)  # shortest first, each group a run of similar lengths
    cost = sum(max(lengths[i] for i in g) * len(g) + 32 for g in groups)
    assert cost == brute_force_cost(lengths, 32)


def test_a_micro_batch_that_fails_cancels_the_others_calls():
    """Micro-batches in turns: where one's expert calls fail (actors down past the restart timeout), the calls the
    others have out are abandoned too, told the error (PendingDispatch.abandon): not left queued for the actors to
    compute once back, ahead of the next requests'. Fails if only the failing layer's calls are cancelled."""
    failure = ExpertsUnavailable("expert actors [1] did not answer")

    class Calls:
        def __init__(self, fails: bool):
            self.fails, self.cancelled = fails, None

        def result(self):
            if self.fails:
                raise failure
            return "outputs"

        def abandon(self, error):
            self.cancelled = error

    first, second = Calls(fails=False), Calls(fails=True)
    done = Calls(fails=False)

    def micro_batch(*layers):
        for calls in layers:
            assert (yield calls) == "outputs"

    with pytest.raises(ExpertsUnavailable):
        run_overlapped([micro_batch(done), micro_batch(second), micro_batch(first, first)])
    assert second.cancelled is failure and first.cancelled is failure and done.cancelled is None


@torch.inference_mode()
def test_a_tied_checkpoint_holding_a_copy_in_place_of_shared_weight_decodes_as_with_it(checkpoint_factory, tmp_path):
    """The encoder's embedding alone in place of `shared.weight` (tied): the front embeds and computes its LM head
    with it, a step's logits the same as from the checkpoint with shared.weight, as transformers loads both. Fails
    if the front refuses it, or embeds or computes the head with another tensor."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import SwitchTransformersForConditionalGeneration

    source, hf_model = checkpoint_factory("plain")
    path = shutil.copytree(source, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(SwitchTransformersForConditionalGeneration.from_pretrained(path).lm_head.weight,
                       hf_model.lm_head.weight)
    prompts = [[5, 9, 23, 1], [7, 11, 1]]
    logits = []
    for folder in (source, path):
        checkpoint = SwitchCheckpoint.open(folder)
        front = SwitchFront(checkpoint, LocalExperts(checkpoint))
        (_, encoded), = front.encode(prompts)
        _, step, _ = front.decode_step(front.start_decoding(encoded), torch.zeros(2, dtype=torch.long))
        logits.append(step)
    torch.testing.assert_close(*logits, rtol=0, atol=1e-6)  # a product's sums may differ with its weights' alignment


def test_a_tied_copy_that_differs_from_shared_weight_fails_the_fronts_load(checkpoint_factory, tmp_path):
    """Tied embeddings with an LM head copy that differs from `shared.weight` (a config.json that is not the weights'):
    the front refuses to load, naming the tensor, rather than serve `shared.weight` for it. Fails if the front skips
    the check (experts.checkpoint.SwitchCheckpoint.check_tied_copies)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from experts.checkpoint import CheckpointError

    source, _ = checkpoint_factory("plain")
    path = shutil.copytree(source, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["shared.weight"] * 2
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    checkpoint = SwitchCheckpoint.open(path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor lm_head\.weight differs from shared"):
        SwitchFront(checkpoint, LocalExperts(checkpoint))
