"""The front's own pieces of T5 math against transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention

from router_service.model import length_groups, relative_position_bucket


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 256)])
def test_relative_position_buckets_are_transformers(bidirectional, num_buckets, max_distance):
    distances = torch.arange(-600, 600)[None, :]
    ours = relative_position_bucket(distances, bidirectional, num_buckets, max_distance)
    theirs = SwitchTransformersAttention._relative_position_bucket(distances, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)


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
