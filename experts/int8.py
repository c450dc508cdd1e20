"""Weight-only int8 expert weights: one int8 per weight and one float32 scale per output channel (the row's
largest magnitude over 127), quantized once at load time from the checkpoint's own tensor.

The matmul is PyTorch's own. Which kernel, measured on a 2-core CPU at switch-base-8's expert shape (768 x 3072,
`wi`, relu, `wo`), one thread, milliseconds per expert:

    tokens                            1      4      8     16     32     64    256
    float32 F.linear                2.05   4.76   6.56   7.48   9.47   15.1   45.2
    int8 _weight_int8pack_mm        0.81   1.25   3.04   5.99  10.23   18.0   87.9
    int8 dequantized, F.linear      1.54   7.87   9.62   9.39  10.93   18.2   52.7

So on the CPU, up to PACKED_MAX_TOKENS tokens go through `torch._weight_int8pack_mm` (activations in bfloat16, the
kernel's fast path; its float32 path is 4-25x slower than plain float32), and more through the weights
dequantized to the activations' dtype for that call (the int8 values converted, the scales applied to the product;
in float16, whose range that product would overflow, to the weights). CUDA has no such kernel in PyTorch, so there the
weights are always dequantized for the call (into the serving dtype, a transient copy per expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKED_MAX_TOKENS = 32  # see the table above: beyond it, dequantizing is as fast or faster
# torch 2.13's _weight_int8pack_mm reads past the weight's rows (and crashes) on AVX-512 CPUs unless their length,
# the input features, is a multiple of this; other lengths are dequantized (every Switch checkpoint's are multiples).
PACKED_FEATURES_MULTIPLE = 16


@dataclass(frozen=True)
class Int8Weight:
    """A linear layer's weight [out, in] as int8 with one scale per output row."""

    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] float32

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)


def quantize(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8, rounded to nearest, computed in float32 on the weight's device."""
    w = weight.to(torch.float32)
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return Int8Weight(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale)


def linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """F.linear for an int8 weight; the output has x's dtype."""
    if x.device.type == "cpu" and x.shape[0] <= PACKED_MAX_TOKENS and x.shape[-1] % PACKED_FEATURES_MULTIPLE == 0:
        packed = torch._weight_int8pack_mm(x.to(torch.bfloat16), weight.q, weight.scale.to(torch.bfloat16))
        return packed.to(x.dtype)
    if x.dtype == torch.float16:  # the product before scaling, ~1/scale times the output, would overflow its range
        return F.linear(x, weight.dequantized(x.dtype))
    return F.linear(x, weight.q.to(x.dtype)) * weight.scale.to(x.dtype)
