"""Activations cross Ray as raw bytes while Ray carries them inside its messages, as arrays above, and come back
as they were in every dtype served; so does an expert actor's call, with what its header says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experts.wire import INLINE_BYTES, call_from_wire, call_to_wire, from_wire, to_wire

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WIDTH = 24


def rows_of(rows: int | str, dtype: torch.dtype) -> int:
    """`rows`, or ("over") one row more than Ray carries inside its messages."""
    return INLINE_BYTES // (WIDTH * (torch.finfo(dtype).bits // 8)) + 1 if rows == "over" else rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, "over"])
def test_activations_come_back_as_they_were(dtype, rows):
    width, itemsize, rows = WIDTH, torch.finfo(dtype).bits // 8, rows_of(rows, dtype)
    t = torch.randn(rows, width).to(dtype)
    wire = to_wire(t)
    assert isinstance(wire, bytes if rows * width * itemsize <= INLINE_BYTES else np.ndarray)
    back = from_wire(wire, dtype, width)
    assert back.dtype == dtype and torch.equal(back, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, "over"])
def test_a_call_comes_back_as_it_was(dtype, rows):
    rows = rows_of(rows, dtype)
    t = torch.randn(rows, WIDTH).to(dtype)
    call = call_to_wire("decoder", 7, [5, 2], [rows // 2, rows - rows // 2], t)
    assert isinstance(call, bytes if rows < rows_of("over", dtype) else np.ndarray)
    stack, layer, experts, counts, back = call_from_wire(call, dtype, WIDTH)
    assert (stack, layer, experts, counts) == ("decoder", 7, [5, 2], [rows // 2, rows - rows // 2])
    assert back.dtype == dtype and torch.equal(back, t)
    assert call_from_wire(call_to_wire("encoder", 3, [0], [1], t[:1]), dtype, WIDTH)[:4] == ("encoder", 3, [0], [1])


def test_a_call_read_in_another_dtype_is_refused():
    """A sender and a receiver of different dtypes would read other rows than were sent: computed as they are, the
    rows past the counts' sum would come back as uninitialised memory."""
    call = call_to_wire("encoder", 0, [1], [4], torch.randn(4, WIDTH))
    with pytest.raises(ValueError, match=r"a call of 4 tokens carried 8 rows"):
        call_from_wire(call, torch.bfloat16, WIDTH)
