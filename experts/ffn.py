"""The expert feed-forward math: transformers' non-gated `wi -> act -> wo`, over tokens grouped by expert. The
weights are tensors or int8 (experts.int8)."""

from __future__ import annotations

import torch

from experts.int8 import Int8Weight, linear

Weight = torch.Tensor | Int8Weight


def expert_ffn(x: torch.Tensor, wi: Weight, wo: Weight, act) -> torch.Tensor:
    """One expert applied to x [tokens, d_model]."""
    h = act(linear(x, wi))
    if isinstance(wo, torch.Tensor) and h.dtype != wo.dtype:  # as transformers does before its `wo`
        h = h.to(wo.dtype)
    return linear(h, wo)


def grouped_ffn(x: torch.Tensor, counts: list[int], weights: list[tuple[Weight, Weight]], act) -> torch.Tensor:
    """x holds the tokens of several experts back to back (counts[i] rows for weights[i]); same order out."""
    out = torch.empty(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for n, (wi, wo) in zip(counts, weights):
        out[start:start + n] = expert_ffn(x[start:start + n], wi, wo, act)
        start += n
    return out
