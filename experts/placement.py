"""Which expert actor hosts which (stack, sparse layer, expert), on which node, with how much of a GPU.

Two ways to place, chosen by `PlacementConfig.gpus`:
- packed (no GPUs): actor i hosts expert indices [i*k, (i+1)*k) of every sparse layer;
- planned (GPUs): experts.plan spreads experts over the GPUs by memory and load, hot experts get replicas,
  and each GPU's experts go to `actors_per_gpu` actors that share it.

Pure Python: the CLI builds its flags from `PlacementConfig` and plans without starting anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from experts.plan import ACTIVATION_RESERVE, Plan, make_plan, parse_bytes, read_stats
from experts.spec import STACKS, ExpertKey, LayerKey, SwitchConfig, sparse_layers


class PlacementError(RuntimeError):
    """Ray cannot find room for the actors the placement asks for."""

RESOURCE_UNITS = 10_000  # Ray counts a resource (a GPU, a CPU, a custom one) in ten-thousandths
# Ray's own resources, which a process asks for by its options (num_cpus, num_gpus, ...), never by name.
RAY_OWN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(resources: dict[str, float]) -> dict[str, float]:
    for name, amount in resources.items():
        if not name:
            raise ValueError("a resource without a name")
        if name in RAY_OWN_RESOURCES:
            raise ValueError(f"{name} is Ray's own resource, which the processes ask for by themselves; name a "
                             "custom resource of the nodes (rayStartParams' resources)")
        if amount < 0:
            raise ValueError(f"{name}: a negative amount, {amount:g}")
    return resources


# Custom Ray resources a process asks for, NAME: AMOUNT.
RayResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


# How long a front waits for the actors to be placed, and for actors that are down: the fleet reads neither.
FRONTS_ONLY = ("timeout_s", "restart_timeout_s")


class PlacementConfig(BaseModel):
    """How to spread the experts: the placement part of the server's config and of `SwitchCluster`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no infinity, no NaN

    experts_per_actor: int | None = Field(
        None, ge=1, description="without GPUs: expert indices packed into one actor, hosting those experts of every "
                                "sparse layer (default: one actor per CPU of the nodes, since the front and the "
                                "experts take turns)")
    cpus: int | None = Field(None, ge=1, description="without GPUs and experts_per_actor: the CPUs to pack for "
                                                     "(default: those of the nodes, read by the expert fleet as it "
                                                     "starts; its fronts take its placement)")
    gpus: int = Field(0, ge=0, description="plan the experts over this many GPUs (0: CPU actors, packed)")
    nodes: int = Field(1, ge=1, description="spread the actors evenly over this many Ray nodes")
    gpu_memory: str = Field("80GiB", description=f"memory of each GPU, {ACTIVATION_RESERVE:.0%} of it kept for "
                                                 "activations")
    actors_per_gpu: int = Field(1, ge=1, description="actors sharing each GPU (each asks for a fraction of it)")
    replicate_hot: int = Field(0, ge=0, description="the busiest experts that get a second copy on another GPU")
    stats: str | None = Field(None, description="token counts per expert (`switch-serve stats`) to balance by")
    actor_resources: RayResources = Field(
        default_factory=dict, description="a Ray resource each expert actor asks for, e.g. a GPU worker group's (the "
                                          "actors sharing a GPU ask for it each)")
    timeout_s: float = Field(600.0, gt=0, description="how long to wait for Ray to find room for the actors")
    restart_timeout_s: float = Field(
        60.0, gt=0, description="how long a sparse layer waits for its expert actors' answers, the time to "
                                "restart one that is down included, before its requests fail with UNAVAILABLE (set "
                                "it above the longest a busy actor takes to answer: a long prompt's layer on a "
                                "slow device)")

    @model_validator(mode="after")
    def _options_of_one_way_to_place(self) -> PlacementConfig:
        """An option the chosen way of placing (planned over GPUs, or packed for CPUs) does not read is refused,
        rather than ignored."""
        parse_bytes(self.gpu_memory)
        defaults = type(self).model_fields
        for name in ("replicate_hot", "stats", "actors_per_gpu", "gpu_memory"):
            if getattr(self, name) != defaults[name].default and not self.gpus:
                raise ValueError(f"{name} needs gpus: it is an option of the plan over GPUs")
        for name in ("experts_per_actor", "cpus"):
            if getattr(self, name) is not None and self.gpus:
                raise ValueError(f"{name}: packs CPU actors; with gpus, the planner places the experts")
        if self.cpus is not None and self.experts_per_actor is not None:
            raise ValueError("cpus: sets how many experts each actor packs, which experts_per_actor sets already")
        return self

    def for_fleet(self) -> PlacementConfig:
        """This config as the fleet sees it: without FRONTS_ONLY, which the fronts alone read, so that changing one
        keeps the fleet and the experts it loaded."""
        return self.model_copy(update={name: type(self).model_fields[name].default for name in FRONTS_ONLY})

    def place(self, config: SwitchConfig, dtype: str) -> Placement:
        """The placement of `config`'s experts, held as `dtype` (an experts.spec.EXPERT_FORMATS entry: "bf16",
        "fp16", "fp32" or "int8"; see expert_format). Packing without
        `experts_per_actor` follows `cpus` (see experts.fleet.for_cluster; one actor per node when unknown)."""
        if not self.gpus:
            per_actor = self.experts_per_actor or experts_per_cpu(config.num_experts, self.cpus or 1, self.nodes)
            return Placement.packed(config, per_actor, self.nodes)
        return Placement.from_plan(self.plan(config, dtype), self.actors_per_gpu)

    def plan(self, config: SwitchConfig, dtype: str) -> Plan:
        """The planner's placement of `config`'s experts over `gpus` GPUs."""
        return make_plan(config, gpus=self.gpus, gpu_memory=parse_bytes(self.gpu_memory), nodes=self.nodes,
                         dtype=dtype, replicate_hot=self.replicate_hot,
                         stats=read_stats(self.stats) if self.stats else None)


def experts_per_cpu(num_experts: int, cpus: float, nodes: int = 1) -> int:
    """Experts per actor for one actor per CPU (at least one per node), each with an equal share.

    The front and the expert actors take turns, so while the experts compute, every core can run one."""
    actors = max(nodes, min(num_experts, int(cpus)))
    per_actor = -(-num_experts // actors)
    if -(-num_experts // per_actor) < nodes:  # fewer actors than nodes (9 experts in 3s over 4 nodes): smaller ones
        per_actor = num_experts // nodes
    return max(1, per_actor)


@dataclass(frozen=True)
class ActorSpec:
    experts: tuple[ExpertKey, ...]
    node: int = 0  # index of the node (the fleet's placement group) it runs on
    gpus: float = 0.0  # GPUs it asks Ray for
    gpu: int = 0  # index of its GPU among its node's (the bundle of the node's group it runs in)


@dataclass(frozen=True)
class Placement:
    actors: tuple[ActorSpec, ...]
    nodes: int = 1

    @classmethod
    def packed(cls, config: SwitchConfig, experts_per_actor: int = 1, nodes: int = 1) -> Placement:
        """Actor i hosts expert indices [i*k, (i+1)*k) of every sparse layer; actors split evenly over nodes."""
        if experts_per_actor < 1:
            raise ValueError(f"experts_per_actor must be at least 1, got {experts_per_actor}")
        layers = [(stack, layer) for stack in STACKS for layer in sparse_layers(config, stack)]
        groups = [range(start, min(start + experts_per_actor, config.num_experts))
                  for start in range(0, config.num_experts, experts_per_actor)]
        if nodes > len(groups):
            raise ValueError(f"nodes: {len(groups)} actors cannot be spread over {nodes} nodes")
        return cls(tuple(ActorSpec(tuple((stack, layer, e) for stack, layer in layers for e in group),
                                   node=i * nodes // len(groups))
                         for i, group in enumerate(groups)), nodes)

    @classmethod
    def from_plan(cls, plan: Plan, actors_per_gpu: int = 1) -> Placement:
        """One actor per planned GPU (or `actors_per_gpu` actors sharing it, with a fraction each)."""
        used = [g for g in plan.gpus if g.experts]
        node_index = {node: i for i, node in enumerate(sorted({g.node for g in used}))}  # nodes left empty go
        actors, node_gpus = [], [0] * len(node_index)  # the GPUs of each node given actors so far
        for gpu in used:
            k = min(actors_per_gpu, len(gpu.experts))  # as many actors as asked, as evenly filled as can be
            groups = [[] for _ in range(k)]
            # Each layer's experts on the GPU shared among the actors, a contiguous run each: a layer's call then
            # keeps all of them busy (whole layers each would leave all but one idle at every layer). Each layer
            # starts where the last one ended, so that the larger runs, and a layer of fewer experts than actors,
            # go round.
            layers: dict[LayerKey, list[ExpertKey]] = {}
            for key in gpu.experts:
                layers.setdefault(key[:2], []).append(key)
            start = 0
            for keys in layers.values():
                m = len(keys)
                for rank, key in enumerate(keys):
                    groups[(start + (rank * k // m if m >= k else rank)) % k].append(key)
                start += m
            # Ray counts a GPU in ten-thousandths: shares rounded down add up to at most the GPU (1/6 rounded to
            # the nearest would ask for 1.0002 of it).
            gpus = math.floor(RESOURCE_UNITS / len(groups)) / RESOURCE_UNITS
            node = node_index[gpu.node]
            actors += [ActorSpec(tuple(group), node=node, gpus=gpus, gpu=node_gpus[node]) for group in groups]
            node_gpus[node] += 1
        return cls(tuple(actors), len(node_index))

    def owners(self) -> dict[LayerKey, dict[int, list[int]]]:
        """For each sparse layer, the indices of the actors that host each expert (several for a replicated one)."""
        table: dict[LayerKey, dict[int, list[int]]] = {}
        for actor, spec in enumerate(self.actors):
            for stack, layer, expert in spec.experts:
                table.setdefault((stack, layer), {}).setdefault(expert, []).append(actor)
        return table
