"""Tensors as they travel and are held: dtype options as torch dtypes, and activations across Ray as numpy
arrays (cheaper than pickled tensors, zero-copy on one node).

numpy has no bfloat16, so bf16 tensors travel as their raw 16-bit patterns and are viewed back on arrival.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from experts.spec import DTYPES


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype option ("fp32", "bf16", "fp16")."""
    return getattr(torch, DTYPES[name].torch)


def to_wire(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only; nothing here writes to them in place.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
