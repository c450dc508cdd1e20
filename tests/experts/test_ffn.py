"""The expert FFN's activations, computed with torch alone, equal transformers' ACT2FN of the same name."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from experts.ffn import ACTIVATION_FUNCTIONS
from experts.spec import ACTIVATIONS


def test_every_served_activation_has_a_function():
    assert set(ACTIVATION_FUNCTIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_equals_transformers(name, dtype):
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    ours, theirs = ACTIVATION_FUNCTIONS[name](x), ACT2FN[name](x)
    assert ours.dtype == theirs.dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours.float(), theirs.float(), atol=tolerance, rtol=tolerance), name
