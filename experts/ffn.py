"""The expert feed-forward math: transformers' non-gated `wi -> act -> wo`, over tokens grouped by expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_ffn(x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, act) -> torch.Tensor:
    """One expert applied to x [tokens, d_model]."""
    h = act(F.linear(x, wi))
    if h.dtype != wo.dtype:  # as transformers does before its `wo`
        h = h.to(wo.dtype)
    return F.linear(h, wo)


def grouped_ffn(x: torch.Tensor, counts: list[int], weights: list[tuple[torch.Tensor, torch.Tensor]],
                act) -> torch.Tensor:
    """x holds the tokens of several experts back to back (counts[i] rows for weights[i]); same order out."""
    out = torch.empty(x.shape[0], weights[0][1].shape[0], dtype=x.dtype, device=x.device)
    start = 0
    for n, (wi, wo) in zip(counts, weights):
        out[start:start + n] = expert_ffn(x[start:start + n], wi, wo, act)
        start += n
    return out
