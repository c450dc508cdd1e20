"""Tensors as they travel and are held: dtype options as torch dtypes, and activations across Ray: inside Ray's
messages up to 1 MiB, as raw bytes; above, as numpy arrays of those bytes through the object store (cheaper than
pickled tensors, zero-copy on one node); an expert actor's call, its activations with a header saying what they are
for, as one argument.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from experts.spec import DTYPES, STACKS

# Ray carries a call's arguments and results inside its messages up to this size, and through its object store above
# it (by default from 100 KiB: 33 rows of switch-base-8's activations in float32, 6 of switch-xxl-128's): a put, a
# fetch and a release more per call, the fetch from the other node's store where the actor is elsewhere, the case the
# actors are there for. Between two raylets on a 2-vCPU VM, a call carrying 48 to 256 rows of 768 floats (144-768
# KiB) and back took 1.1-3.5 ms inlined against 8.0-11.8 through the stores. On one node, 144-576 KiB took 1.1-2.8
# against 2.9-3.3, but 768 KiB 2.2-4.1 against 3.0-3.2: the bound gives up up to a millisecond there for the
# calls to other nodes (python -m cluster.bench_wire, docs/BENCHMARKS.md). The environment of the processes that
# send or return activations: the fronts and the expert actors.
INLINE_ACTIVATIONS_ENV = {"RAY_max_direct_call_object_size": str(1 << 20)}
INLINE_BYTES = int(INLINE_ACTIVATIONS_ENV["RAY_max_direct_call_object_size"])


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype option ("fp32", "bf16", "fp16")."""
    return getattr(torch, DTYPES[name].torch)


def to_wire(t: torch.Tensor) -> bytes | np.ndarray:
    """Activations as they cross Ray: their raw bytes while Ray carries them inside its messages (a call of 1 to 16
    tokens and its reply took 0.73-0.96 ms against 0.95-1.10 as arrays, whose buffers Ray's serializer sets apart),
    an array of those bytes above that, which a node's object store hands over without a copy (as bytes, a call
    carrying 3 MiB took twice as long)."""
    return for_ray(bytes_of(t))


def bytes_of(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a numpy array on the host (numpy has no bfloat16)."""
    return t.detach().cpu().contiguous().view(torch.uint8).numpy()


def for_ray(a: np.ndarray) -> bytes | np.ndarray:
    """An array as it crosses Ray (see `to_wire`): its raw bytes up to INLINE_BYTES, the array above."""
    return a.tobytes() if a.nbytes <= INLINE_BYTES else a


def from_ray(x: bytes | np.ndarray) -> np.ndarray:
    """What `for_ray` sent, as an array (read-only)."""
    return np.frombuffer(x, np.uint8) if isinstance(x, bytes) else x


def from_wire(x: bytes | np.ndarray, dtype: torch.dtype, width: int) -> torch.Tensor:
    """The tensor [rows, width] of `dtype` that `to_wire` sent as `x` (or an array of `dtype` itself)."""
    with warnings.catch_warnings():
        # What Ray hands over is read-only; nothing here writes to it in place.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(from_ray(x))
    return t.view(dtype).view(-1, width)


def call_to_wire(stack: str, layer: int, experts: list[int], counts: list[int],
                 tokens: torch.Tensor) -> bytes | np.ndarray:
    """An expert actor's call as one argument (see `to_wire`): a header of int32s (the stack's index in STACKS, the
    layer, the number of experts, the experts, then their tokens' counts), then the tokens. Ray serializes each
    argument apart, and all but raw bytes through pickle: made as a decoding step makes them, a call of 1 or 16
    tokens and its reply took 0.07-0.53 ms less than with the five as arguments of their own (0.3 in the median
    round), back to back 0.02-0.08 less (docs/BENCHMARKS.md)."""
    header = np.array([STACKS.index(stack), layer, len(experts), *experts, *counts], np.int32).view(np.uint8)
    return for_ray(np.concatenate([header, bytes_of(tokens).reshape(-1)]))


def call_from_wire(call: bytes | np.ndarray, dtype: torch.dtype,
                   width: int) -> tuple[str, int, list[int], list[int], torch.Tensor]:
    """The stack, layer, experts, their tokens' counts and the tokens [rows, width] of `dtype` that `call_to_wire`
    sent as `call`."""
    a = from_ray(call)
    n = int(a[8:12].view(np.int32)[0])
    header = a[:4 * (3 + 2 * n)].view(np.int32).tolist()
    counts, tokens = header[3 + n:], from_wire(a[4 * (3 + 2 * n):], dtype, width)
    if tokens.shape[0] != sum(counts):  # the sender's dtype or width is not the receiver's
        raise ValueError(f"a call of {sum(counts)} tokens carried {tokens.shape[0]} rows of {width} {dtype}")
    return STACKS[header[0]], header[1], header[3:3 + n], counts, tokens
