"""Starting the expert actors where the placement says, through a Ray placement group.

An `ExpertFleet` actor owns one placement group (a bundle per node, `STRICT_SPREAD`, so each planned node is a
different Ray node and the resources of all its actors are reserved at once) and the expert actors inside it.
Killing the fleet releases both. Shared fleets are named and detached: every Serve replica serving the same
checkpoint and placement finds the same fleet, and so the same actors.
"""

from __future__ import annotations

import hashlib
import logging
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from experts.actor import ExpertActor
from experts.checkpoint import SwitchCheckpoint
from experts.placement import Placement, PlacementConfig, PlacementError
from experts.spec import expert_tensor_names

log = logging.getLogger(__name__)

SHARED_NAMESPACE = "switch-serve"


def node_cpus_largest_first() -> list[float]:
    """The CPUs of each live node of the running Ray cluster, largest first."""
    return sorted((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), reverse=True)


def this_node_cpus() -> int:
    """The CPUs Ray counts on this process's node (on Kubernetes, the container's limit rather than the host's
    cores), at most the cores this process may run on."""
    here = ray.get_runtime_context().get_node_id()
    counted = next(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == here)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(int(counted), cores))


def for_cluster(config: PlacementConfig) -> PlacementConfig:
    """`config` with `cpus` read from the running Ray cluster where the packing needs it: the CPUs of the
    `nodes` largest nodes. Read once and passed on, so that every replica packs the same way."""
    if config.gpus or config.experts_per_actor or config.cpus or not ray.is_initialized():
        return config
    return config.model_copy(update={"cpus": max(1, int(sum(node_cpus_largest_first()[:config.nodes])))})


def served_placement(checkpoint: SwitchCheckpoint, config: PlacementConfig,
                     dtype: str | None) -> tuple[Placement, str]:
    """(placement, dtype) of a checkpoint served as `config` says, in `dtype` (None: the checkpoint's): what the
    fronts build their dispatch on, and what names the fleet they share."""
    dtype = dtype or checkpoint.dtype_name
    return for_cluster(config).place(checkpoint.config, dtype), dtype


def actor_cpus(placement: Placement) -> float:
    """CPUs each expert actor asks for: a fair share of the CPUs of the weakest node it needs (and of what the
    cluster has free), at most one.

    An actor asking for more than a node has stays pending, so small machines get fractions."""
    sizes = node_cpus_largest_first()
    available = ray.available_resources().get("CPU", 0.0)
    weakest = min(sizes[placement.nodes - 1] if len(sizes) >= placement.nodes else 0.0, available)
    per_node = max(sum(1 for a in placement.actors if a.node == node) for node in range(placement.nodes))
    return max(0.01, min(1.0, round(weakest / (per_node + 1), 2)))


def bundles(placement: Placement, cpus: float, resources: dict[str, float]) -> list[dict[str, float]]:
    """One bundle per node: the sum of what its actors ask for."""
    out = [{"CPU": 0.0} for _ in range(placement.nodes)]
    for spec in placement.actors:
        bundle = out[spec.node]
        for name, amount in {"CPU": cpus, "GPU": spec.gpus, **resources}.items():
            if amount:
                bundle[name] = round(bundle.get(name, 0.0) + amount, 4)
    return out


class ExpertFleet:
    """Wrapped with `ray.remote` by `start_fleet`. Starts its actors once; later callers get the same ones."""

    def __init__(self, checkpoint: SwitchCheckpoint, placement: Placement, dtype: str,
                 actor_resources: dict[str, float], timeout_s: float):
        self.checkpoint, self.placement, self.dtype = checkpoint, placement, dtype
        self.actor_resources, self.timeout_s = actor_resources, timeout_s
        self.group = None
        self.handles: list = []

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def actors(self) -> list:
        """The expert actors, started (and their weights loaded) on the first call."""
        if not self.handles:
            self._start()
        return self.handles

    def _start(self) -> None:
        cpus = actor_cpus(self.placement)
        wanted = bundles(self.placement, cpus, self.actor_resources)
        group = placement_group(wanted, strategy="STRICT_SPREAD")
        if not group.wait(self.timeout_s):
            remove_placement_group(group)
            raise PlacementError(
                f"placement: Ray found no room within {self.timeout_s:.0f} s for {len(wanted)} node(s) holding "
                f"{wanted} (one node each); the cluster has {_alive_node_resources()}")
        remote = ray.remote(ExpertActor)
        handles = []
        for spec in self.placement.actors:
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=spec.node)
            # An actor that dies is started again (reloading its weights) and the calls it had in flight are
            # sent again: it holds no per-request state, so a retried call gives the same result.
            handles.append(remote.options(num_cpus=cpus, num_gpus=spec.gpus, resources=self.actor_resources,
                                          scheduling_strategy=strategy, max_restarts=-1,
                                          max_task_retries=-1).remote(
                self.checkpoint, {key: expert_tensor_names(*key) for key in spec.experts}, self.dtype))
        try:
            ray.get([h.info.remote() for h in handles])  # a load failure surfaces here, not mid-request
        except BaseException:
            for h in handles:
                ray.kill(h)
            remove_placement_group(group)
            raise
        self.group, self.handles = group, handles

    def release(self) -> None:
        """Stop the actors and free the placement group's reservation (Ray keeps a group made by a non-detached
        actor until its job ends, so killing the fleet alone would leak it)."""
        for h in self.handles:
            ray.kill(h)
        if self.group is not None:
            remove_placement_group(self.group)
        self.group, self.handles = None, []


def stop_fleet(fleet) -> None:
    """Release a fleet's actors and placement group, then the fleet itself."""
    try:
        ray.get(fleet.release.remote())
    finally:
        ray.kill(fleet)


def _alive_node_resources() -> list[dict[str, float]]:
    skip = ("memory", "object_store_memory")
    return [{k: v for k, v in n["Resources"].items() if k not in skip and not k.startswith("node:")}
            for n in ray.nodes() if n["Alive"]]


def fleet_name(checkpoint: SwitchCheckpoint, placement: Placement, dtype: str) -> str:
    digest = hashlib.sha1(repr((str(checkpoint.path), placement, dtype)).encode()).hexdigest()[:12]
    return f"experts-{digest}"


def start_fleet(checkpoint: SwitchCheckpoint, placement: Placement, dtype: str, *, shared: bool = False,
                actor_resources: dict[str, float] | None = None, timeout_s: float = 600.0) -> tuple:
    """(fleet, its expert actors in placement order), once every actor has loaded its weights."""
    # The fleet owns the actors, and they die with it: keep it on this (the front's) node, not on an expert
    # node that may go away.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options = {"num_cpus": 0, "scheduling_strategy": here}
    if shared:
        options.update(name=fleet_name(checkpoint, placement, dtype), namespace=SHARED_NAMESPACE,
                       lifetime="detached", get_if_exists=True)
    fleet = ray.remote(ExpertFleet).options(**options).remote(
        checkpoint, placement, dtype, actor_resources or {}, timeout_s)
    try:
        return fleet, ray.get(fleet.actors.remote())
    except BaseException:
        if not shared:  # a shared fleet stays, empty, for the next front to try again
            ray.kill(fleet)
        raise


def stop_shared_fleet(checkpoint: SwitchCheckpoint, placement: Placement, dtype: str) -> None:
    """Stop a shared fleet, its actors and its placement group (when its Serve app is taken down)."""
    try:
        fleet = ray.get_actor(fleet_name(checkpoint, placement, dtype), namespace=SHARED_NAMESPACE)
    except ValueError:  # not running
        return
    stop_fleet(fleet)
