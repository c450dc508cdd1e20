"""The front's own pieces of T5 math against transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention

from router_service.model import relative_position_bucket


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 256)])
def test_relative_position_buckets_are_transformers(bidirectional, num_buckets, max_distance):
    distances = torch.arange(-600, 600)[None, :]
    ours = relative_position_bucket(distances, bidirectional, num_buckets, max_distance)
    theirs = SwitchTransformersAttention._relative_position_bucket(distances, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
