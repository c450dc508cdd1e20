"""Weight-only int8 expert weights: one int8 per weight and one float32 scale per output channel (the row's
largest magnitude over 127), quantized once at load time from the checkpoint's own tensor.

The matmul is PyTorch's own. Which kernel, measured on a 2-core AMD EPYC VM (AVX-512 with bfloat16) at
switch-base-8's expert shape (768 x 3072, `wi`, relu, `wo`), one thread, milliseconds per expert (median of 7):

    tokens                            1      4      8     16     32     64    256
    float32 F.linear                0.91   1.70   2.58   3.10   4.90   7.86  26.81
    int8 _weight_int8pack_mm        0.26   0.51   1.03   2.01   3.97   8.17  31.78
    int8 as float32, F.linear       0.73   1.76   3.23   3.86   5.26   8.41  28.00

(On a 2-core Intel Xeon VM, the packed kernel took 0.81 ms for one token against float32's 2.05, 10.2 against 9.5
for 32 and 87.9 against 45.2 for 256.)

So on the CPU, up to PACKED_MAX_TOKENS tokens go through `torch._weight_int8pack_mm` (activations and scales in
bfloat16, the kernel's fast path; its float32 path is 4-25x slower than plain float32), and more through the same
arithmetic by float32's own matmul: the activations and scales rounded to bfloat16 as the kernel rounds them, the
int8 values as float32 for that call, the output rounded to bfloat16 as the kernel's is. Both give a token the same
output up to the order of float32's sums (99.99% of outputs equal bit for bit at switch-base-8's shape), so a
token's expert output does not depend on how many tokens share its expert in a step. CUDA has no such kernel in
PyTorch: there the int8 values are cast to the serving dtype for the call (a transient copy per expert), and the
product scaled per output channel after (in float16, whose range that product would overflow, the weights are
dequantized first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKED_MAX_TOKENS = 32  # see the table above: beyond it, float32's matmul is about as fast, then faster
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
    if x.device.type == "cpu" and x.shape[-1] % PACKED_FEATURES_MULTIPLE == 0:
        scale = weight.scale.to(torch.bfloat16)
        if x.shape[0] <= PACKED_MAX_TOKENS:
            out = torch._weight_int8pack_mm(x.to(torch.bfloat16), weight.q, scale)
        else:  # the kernel's roundings (see the module's docstring), in float32: no float16 range to overflow
            out = (F.linear(x.to(torch.bfloat16).float(), weight.q.float()) * scale.float()).to(torch.bfloat16)
        return out.to(x.dtype)
    if x.dtype == torch.float16:  # the product before scaling, ~1/scale times the output, would overflow its range
        return F.linear(x, weight.dequantized(x.dtype))
    return F.linear(x, weight.q.to(x.dtype)) * weight.scale.to(x.dtype)
