"""Tensors as they travel and are held: dtype options as torch dtypes, and activations across Ray as numpy
arrays (cheaper than pickled tensors), inside Ray's messages up to 1 MiB.

numpy has no bfloat16, so bf16 tensors travel as their raw 16-bit patterns and are viewed back on arrival.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from experts.spec import DTYPES

# Ray carries a call's arguments and results inside its messages up to this size, and through its object store above
# it (by default from 100 KiB: 33 rows of switch-base-8's activations in float32, 6 of switch-xxl-128's): a put, a
# fetch and a release more per call, the fetch from the other node's store where the actor is elsewhere, the case the
# actors are there for. Between two raylets on a 2-vCPU VM, a call carrying 48 to 256 rows of 768 floats (144-768
# KiB) and back took 1.1-3.5 ms inlined against 8.0-11.8 through the stores. On one node, 144-576 KiB took 1.1-2.8
# against 2.9-3.3, but 768 KiB 2.2-4.1 against 3.0-3.2: the bound gives up up to a millisecond there for the
# calls to other nodes (python -m cluster.bench_wire, docs/BENCHMARKS.md). The environment of the processes that
# send or return activations: the fronts and the expert actors.
INLINE_ACTIVATIONS_ENV = {"RAY_max_direct_call_object_size": str(1 << 20)}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype option ("fp32", "bf16", "fp16")."""
    return getattr(torch, DTYPES[name].torch)


def to_wire(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():
        # Arrays that Ray hands over are read-only; nothing here writes to them in place.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
