"""Activations cross Ray as raw bytes while Ray carries them inside its messages, as arrays above, and come back
as they were in every dtype served."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experts.wire import INLINE_BYTES, from_wire, to_wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, "over"])
def test_activations_come_back_as_they_were(dtype, rows):
    width = 24
    itemsize = torch.finfo(dtype).bits // 8
    rows = INLINE_BYTES // (width * itemsize) + 1 if rows == "over" else rows
    t = torch.randn(rows, width).to(dtype)
    wire = to_wire(t)
    assert isinstance(wire, bytes if rows * width * itemsize <= INLINE_BYTES else np.ndarray)
    back = from_wire(wire, dtype, width)
    assert back.dtype == dtype and torch.equal(back, t)
