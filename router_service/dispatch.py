"""Scatter a sparse layer's tokens to the expert actors that own them and gather the results back."""

from __future__ import annotations

import ray
import torch

from experts.wire import from_wire, to_wire


class ExpertDispatcher:
    """One call per actor that has tokens, all in flight at once; results put back in token order.

    `owners[(stack, layer)][expert]` is the index in `actors` of the actor hosting that expert.
    """

    def __init__(self, actors: list, owners: dict[tuple[str, int], dict[int, int]], num_experts: int):
        self.actors = actors
        self.owner_of = {layer: torch.tensor([table[e] for e in range(num_experts)])
                         for layer, table in owners.items()}
        self.num_experts = num_experts

    def __call__(self, stack: str, layer: int, tokens: torch.Tensor, expert: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(tokens)
        index = keep.nonzero().squeeze(1)
        if index.numel() == 0:
            return out
        owner = self.owner_of[(stack, layer)][expert[index]]
        # Group tokens by owning actor, then by expert within it (stable: token order kept inside a group).
        order = torch.argsort(owner * self.num_experts + expert[index], stable=True)
        index, owner = index[order], owner[order]
        actors, per_actor = torch.unique_consecutive(owner, return_counts=True)
        calls, start = [], 0
        for actor, n in zip(actors.tolist(), per_actor.tolist()):
            chunk = index[start:start + n]
            experts, counts = torch.unique_consecutive(expert[chunk], return_counts=True)
            calls.append(self.actors[actor].forward.remote(
                stack, layer, experts.tolist(), counts.tolist(), to_wire(tokens[chunk])))
            start += n
        results = ray.get(calls)
        out[index] = torch.cat([from_wire(r, tokens.dtype) for r in results])
        return out
