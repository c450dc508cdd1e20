"""Which expert actor hosts which (stack, sparse layer, expert)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import SwitchTransformersConfig

from cluster.checkpoint import STACKS, sparse_layers

ExpertKey = tuple[str, int, int]  # (stack, block index, expert index)
LayerKey = tuple[str, int]  # (stack, block index) of a sparse layer


@dataclass(frozen=True)
class Placement:
    actors: tuple[tuple[ExpertKey, ...], ...]  # the experts each actor hosts

    @classmethod
    def packed(cls, config: SwitchTransformersConfig, experts_per_actor: int = 1) -> "Placement":
        """Actor i hosts expert indices [i*k, (i+1)*k) of every sparse layer."""
        if experts_per_actor < 1:
            raise ValueError(f"experts_per_actor must be at least 1, got {experts_per_actor}")
        layers = [(stack, layer) for stack in STACKS for layer in sparse_layers(config, stack)]
        groups = [range(start, min(start + experts_per_actor, config.num_experts))
                  for start in range(0, config.num_experts, experts_per_actor)]
        return cls(tuple(tuple((stack, layer, e) for stack, layer in layers for e in group) for group in groups))

    def owners(self) -> dict[LayerKey, dict[int, int]]:
        """For each sparse layer, the actor index that hosts each expert."""
        table: dict[LayerKey, dict[int, int]] = {}
        for actor, keys in enumerate(self.actors):
            for stack, layer, expert in keys:
                table.setdefault((stack, layer), {})[expert] = actor
        return table
