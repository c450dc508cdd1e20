"""Starting the expert actors where the placement says, through Ray placement groups.

An `ExpertFleet` actor owns a placement group per planned node (`STRICT_PACK`, each on a Ray node that none of
the groups before it took) and the expert actors inside them. A group holds a bundle per GPU, which the actors
sharing that GPU ask their fractions of, so that they share one physical GPU (Ray gives fractions of a bundle of
several GPUs out where they fit, and actors of different planned GPUs, started or restarted together, mix); without
GPUs, one bundle for all the node's actors. The actors are the fleet's children and die with it; its groups last
until it releases them, or its creator's job ends (a fleet started again removes those its predecessor left). Served,
the fleet is a Serve deployment of its own that every front replica asks for the actors.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import threading
import time
import uuid
from typing import NamedTuple

import ray
from ray.util.placement_group import (
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from experts.actor import ExpertActor
from experts.checkpoint import SwitchCheckpoint
from experts.ffn import KEPT_HEAP_ENV
from experts.placement import RESOURCE_UNITS, Placement, PlacementConfig, PlacementError
from experts.plan import parse_bytes
from experts.spec import expert_format, expert_tensor_names
from experts.wire import INLINE_ACTIVATIONS_ENV

log = logging.getLogger(__name__)

# How often a fleet waiting for room says so (in its status and its log).
ROOM_POLL_S = 10.0
# How long a fleet holding some of its nodes' groups waits for the next before it gives them back and tries again
# after a random pause: two fleets starting at once, each holding a node the other needs, would wait for good.
HOLDING_WAIT_S = 60.0
# How often a fleet looks whether the fleet it replaces, of the same config, has stopped.
PREDECESSOR_POLL_S = 0.5
# Calls a fleet actor answers at once (each `actors` call may wait for the load).
FLEET_CALLERS = 16
# How many times Ray starts again an expert actor that dies (reloading its weights each time). One lost once more is
# dead for good: while loading, the load fails naming it (an actor killed for memory as it reads its weights would
# otherwise be started again for ever while the load waits); while serving, its fleet starts a new one (replace_dead).
ACTOR_RESTARTS = 3


class ExpertLoadError(RuntimeError):
    """An expert actor's process kept dying as it loaded."""


def node_cpus_largest_first(needs: dict[str, float] | None = None) -> list[float]:
    """The CPUs of each live node of the running Ray cluster that has at least `needs` of each of its resources
    (GPUs, custom resources), largest first."""
    needs = needs or {}
    return sorted((n["Resources"].get("CPU", 0.0) for n in ray.nodes()
                   if n["Alive"] and all(n["Resources"].get(name, 0.0) >= amount for name, amount in needs.items())),
                  reverse=True)


def compute_threads(asked: int | None = None) -> int:
    """The threads of a process's math: `asked`, else the CPUs Ray counts on its node (on Kubernetes, the
    container's limit rather than the host's cores); at most the cores this process may run on, since busy threads
    beyond them only wait for one another."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if asked is None:
        here = ray.get_runtime_context().get_node_id()
        asked = int(next(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == here))
    return max(1, min(asked, cores))


def for_cluster(config: PlacementConfig) -> PlacementConfig:
    """`config` with `cpus` read from the running Ray cluster where the packing needs it: the CPUs of the
    `nodes` largest nodes that have the resources an actor asks for."""
    if config.gpus or config.experts_per_actor or config.cpus or not ray.is_initialized():
        return config
    sizes = node_cpus_largest_first(config.actor_resources)
    return config.model_copy(update={"cpus": max(1, int(sum(sizes[:config.nodes])))})


def served_placement(checkpoint: SwitchCheckpoint, config: PlacementConfig, dtype: str,
                     quantize: str = "none") -> Placement:
    """Which actor hosts which expert of a checkpoint served as `config` says, in `dtype`, its experts held as
    `quantize` says, packed for the running cluster's CPUs where `config` leaves that open. Made by the fleet as it
    starts (or by the Python API's front, which hands it to the fleet it starts); its fronts take it from the fleet
    (FleetActors), so that they never pack otherwise."""
    return for_cluster(config).place(checkpoint.config, expert_format(dtype, quantize))


def actor_cpus(placement: Placement, resources: dict[str, float]) -> float:
    """CPUs each expert actor asks for: a fair share of the CPUs of the weakest node it needs, one share left for a
    front (fronts ask for none: they take turns with the experts), at most one. The nodes counted are those that
    could hold a node's bundle of GPUs and of `resources` (each actor's custom resources): a GPU node's CPUs size the
    actors on GPUs, however many CPUs the nodes without GPUs have.

    An actor asking for more than a node has stays pending, so small machines get fractions. Read from the
    nodes' sizes, not from what is free at the time, so that a fleet started again asks for the same."""
    needs = {}
    for node in bundles(placement, 0.0, resources):
        for name in {name for bundle in node for name in bundle} - {"CPU"}:
            needs[name] = max(needs.get(name, 0.0), sum(bundle.get(name, 0.0) for bundle in node))
    sizes = node_cpus_largest_first(needs)
    weakest = sizes[placement.nodes - 1] if len(sizes) >= placement.nodes else 0.0
    per_node = max(sum(1 for a in placement.actors if a.node == node) for node in range(placement.nodes))
    # Rounded down to Ray's unit of a resource, so that a node's actors together never ask for more than it has.
    share = min(1.0, math.floor(weakest / (per_node + 1) * RESOURCE_UNITS) / RESOURCE_UNITS)
    if weakest and not share:
        raise PlacementError(f"placement: {per_node} expert actors on a node of {weakest:g} CPUs get no share of them "
                             f"(Ray's least is {1 / RESOURCE_UNITS} CPU): put more experts in each actor "
                             f"(experts_per_actor), or use larger nodes")
    return share or 1 / RESOURCE_UNITS  # no node could hold them yet: the bundle waits for one


def bundles(placement: Placement, cpus: float, resources: dict[str, float]) -> list[list[dict[str, float]]]:
    """For each node, the bundles of its placement group: one per GPU (`ActorSpec.gpu`), or one without GPUs; each the
    sum of what its actors ask for, and the whole GPU they share."""
    out: list[list[dict[str, float]]] = [[] for _ in range(placement.nodes)]
    for spec in placement.actors:
        node = out[spec.node]
        node += [{"CPU": 0.0} for _ in range(spec.gpu + 1 - len(node))]
        bundle = node[spec.gpu]
        for name, amount in {"CPU": cpus, "GPU": spec.gpus, **resources}.items():
            if amount:
                bundle[name] = round(bundle.get(name, 0.0) + amount, 4)
    for bundle in (bundle for node in out for bundle in node):
        if "GPU" in bundle:  # the actors sharing a GPU ask for a little less than all of it between them
            bundle["GPU"] = 1.0
    return out


class FleetActors(NamedTuple):
    """What a fleet hands its fronts."""

    actors: list  # the expert actors in placement order; none until they have loaded
    status: str  # "ready", or what they wait for
    fleet_id: str  # new each time the fleet starts again (with new actors)
    serves: str  # what it serves: the fleet_name of its checkpoint, placement config, dtype and quantization
    placement: Placement | None = None  # which actor hosts which expert, with the actors
    # With the actors: what those of the groups Ray is moving wait for (their node lost: each group waits for room
    # on another), "" where every group is placed. Calls to those actors wait; the fronts take no new requests.
    moving: str = ""
    # Before them: whether it waits for the fleet it replaces, which keeps its actors for the fronts still draining:
    # for room while another version's holds placement groups, or for one of its own version to stop.
    behind_predecessor: bool = False
    # The fleet's name: kept as it starts again, another for a fleet that replaces it (a served app's new version).
    name: str = ""
    # Before them: whether it may replace a fleet of its own name that still stops (it waits for that one to stop, or
    # has yet to look), whose fronts keep that one's actors meanwhile.
    replacing: bool = False


class ExpertFleet:
    """Owns a placement group per node and the expert actors inside them. The actors are its children: they die with
    it. The groups last until it releases them, or until its creator's job ends (see `name`).

    Runs as a Ray actor for the Python API and as a Serve deployment of the served app, whose controller starts
    a new one (with new actors) when its process dies. It starts at once and places and loads its actors on a
    thread, waiting as long as it takes for Ray to find room: `actors()` says where it stands, and hands
    the actors out once they have loaded.
    """

    def __init__(self, checkpoint: SwitchCheckpoint, config: PlacementConfig, dtype: str, quantize: str = "none",
                 name: str | None = None, placement: Placement | None = None, model_id: str | None = None,
                 family: str | None = None):
        self.checkpoint, self.dtype, self.quantize = checkpoint, dtype, quantize
        self.model_id = model_id  # the label of its actors' metrics (see ExpertActor)
        self.placement = placement if placement is not None else served_placement(checkpoint, config, dtype, quantize)
        self.actor_resources = config.actor_resources
        self.gpu_memory = parse_bytes(config.gpu_memory) if config.gpus else None  # what the plan sized each GPU by
        self.serves = fleet_name(checkpoint, config, dtype, quantize)
        # Names the placement groups. Ray keeps a group until its creator's job ends, even when the creator dies,
        # so a fleet started again after its process died removes the groups its predecessor left.
        self.name = name or self.serves
        # The names of the fleets that replace one another (a served app's) begin with it: "{family}-{version}".
        self.family = family
        self.behind_predecessor = False  # see FleetActors
        self.replacing = True  # see FleetActors: until it has looked
        self.loaded = False  # whether its actors have loaded once, and so may serve fronts (until released)
        self.groups: list = []  # a node's after another's, as each finds room
        self.handles: list = []
        self._cpus = None  # each actor's, as _start found them
        self.error: BaseException | None = None
        self._error_traceback = None
        self.state = "starting"
        self.fleet_id = uuid.uuid4().hex  # new each time the fleet starts, and so its actors
        self._lock = threading.Lock()  # the starting thread and release() take turns with groups and handles
        self._done = threading.Event()  # set once the actors have loaded, or failed to
        self._released = False
        threading.Thread(target=self._start, name="switch-serve-fleet", daemon=True).start()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def actors(self, wait_s: float = 0.0) -> FleetActors:
        """The expert actors once loaded, waiting up to `wait_s` for that; none, and why, before. Raises what
        failed the load (a bad checkpoint, ...). Runs on a thread of its own (a threaded Ray actor; Serve runs
        sync methods in a thread pool)."""
        self._done.wait(wait_s)
        self._raise_error()
        with self._lock:  # the actors, their state and id as one: a replacement may begin meanwhile
            if not self._done.is_set():
                return FleetActors([], self.state, self.fleet_id, self.serves,
                                   behind_predecessor=self.behind_predecessor, name=self.name,
                                   replacing=self.replacing)
            # No actors once released.
            view = FleetActors(list(self.handles), self.state, self.fleet_id, self.serves, self.placement,
                               name=self.name)
            groups = list(self.groups)
        return view._replace(moving=moving(groups)) if view.actors else view

    def check_health(self) -> None:
        """Serve's health check: a fleet whose load failed is replaced, and so tried again."""
        self._raise_error()

    def _raise_error(self) -> None:
        """What failed the load, if anything, with the traceback it failed with (raised again as it is, it would gain
        this call's frames each time a front or Serve asks)."""
        if self.error is not None:
            raise self.error.with_traceback(self._error_traceback)

    def _start(self) -> None:
        try:
            cpus = actor_cpus(self.placement, self.actor_resources)
            wanted = bundles(self.placement, cpus, self.actor_resources)
            while (stopping := self._predecessor_stopping()) and not self._released:
                # Its fronts start without it meanwhile, so that Serve goes on draining the old ones.
                self._say("waiting for the fleet it replaces, of the same config, to stop")
                self.behind_predecessor = True
                time.sleep(PREDECESSOR_POLL_S)
            self.behind_predecessor = self.replacing = False
            if stopping:  # stopped itself first: the groups of its name are that one's, its draining fronts' actors
                return
            with self._lock:
                # A predecessor's groups, left when its process died: removed even when stopped before starting.
                _remove_groups_named(self.name, len(wanted))
            if not self._reserve(wanted):
                return
            self._say(f"loading {len(self.placement.actors)} expert actors")
            self._cpus = cpus
            with self._lock:
                if self._released:
                    return
                for spec in self.placement.actors:  # each kept as it starts: a failure to start one releases those
                    self.handles.append(self._new_actor(spec))
                handles = list(self.handles)
            self._wait_loaded(handles)
        except BaseException as e:
            self._failed(e)
        finally:
            self._done.set()

    def _reserve(self, wanted: list[list[dict[str, float]]]) -> bool:
        """A placement group for each node of `wanted` (its bundles), one after another, each kept off the Ray nodes
        of those before it; False where the fleet was released meanwhile. Holding some, it gives them back where the
        next one finds no room within HOLDING_WAIT_S, and starts again after a random pause."""
        began, tries = time.monotonic(), 1
        while True:
            taken: list[str] = []  # the Ray nodes of the groups placed so far
            for node in range(len(wanted)):
                if (node_id := self._place(wanted, node, taken, began, tries)) is None:
                    break
                taken.append(node_id)
            if len(taken) == len(wanted):
                return True
            with self._lock:
                if self._released:
                    return False
                self._remove_groups()
            log.warning("expert fleet: gave back the %d node(s) it held after %.0f s, waiting for node %d of %d (%s); "
                        "trying again", len(taken), time.monotonic() - began, len(taken) + 1, len(wanted),
                        wanted[len(taken)])
            time.sleep(random.uniform(0, ROOM_POLL_S))
            tries += 1

    def _place(self, wanted: list[list[dict[str, float]]], node: int, taken: list[str], began: float,
               tries: int) -> str | None:
        """The Ray node of node `node`'s group, once placed; None where the fleet was released meanwhile, or where
        the groups `taken` are held and it found no room within HOLDING_WAIT_S. `began` and `tries`: when the
        fleet began placing its groups, and how many times, for its state."""
        with self._lock:
            if self._released:
                return None
            group = placement_group(wanted[node], strategy="STRICT_PACK", name=group_name(self.name, node),
                                    bundle_label_selector=[not_on(taken)] * len(wanted[node]) if taken else None)
            self.groups.append(group)
        def waiting() -> str:
            return (f"waiting {time.monotonic() - began:.0f} s for room for node {node + 1} of {len(wanted)}"
                    + (f" (try {tries})" if tries > 1 else "") + f": {wanted[node]} on one node, none of the "
                    f"{len(taken)} taken; {cluster_has()}")

        self._say(waiting())
        waited = 0.0
        # A node lost as the group was placed on it leaves it placed nowhere until Ray moves it.
        while not group.wait(ROOM_POLL_S) or not (node_id := placed_on(group)):
            waited += ROOM_POLL_S
            if self._released or (taken and waited >= HOLDING_WAIT_S):
                return None
            state, self.behind_predecessor = waiting(), self._predecessor_holds_groups()
            self._say(state)
            log.warning("expert fleet %s", state)
        self.behind_predecessor = False
        return node_id

    def _predecessor_stopping(self) -> bool:
        """Whether a fleet this one replaces still stops, keeping its actors for the fronts draining (a served
        fleet's: see router_service.server.ServedFleet); its groups bear this one's name where its config is the
        same, and this one would remove them."""
        return False

    def _predecessor_holds_groups(self) -> bool:
        """Whether another fleet of its family (another version) holds placement groups."""
        if self.family is None:
            return False
        return any(of_family(name, self.family) and not name.startswith(f"{self.name}-") for name in created_groups())

    def _remove_groups(self) -> None:
        """Free the groups' reservations (the caller holds the lock): one that fails to (its GCS call, say) leaves
        the others to be freed."""
        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception as e:
                log.warning("removing placement group %s failed: %s", group.id, e)
        self.groups = []

    def _new_actor(self, spec):
        """The actor of `spec` (an ActorSpec) in its bundle of its node's group. One that dies is started again by
        Ray (reloading its weights), up to ACTOR_RESTARTS times, and the calls it had in flight are sent again: it
        holds no per-request state, so a retried call gives the same result."""
        strategy = PlacementGroupSchedulingStrategy(self.groups[spec.node], placement_group_bundle_index=spec.gpu)
        experts = {key: expert_tensor_names(*key) for key in spec.experts}
        own = self.checkpoint.with_only([name for pair in experts.values() for name in pair])
        return ray.remote(ExpertActor).options(
            num_cpus=self._cpus, num_gpus=spec.gpus, resources=self.actor_resources, scheduling_strategy=strategy,
            max_restarts=ACTOR_RESTARTS, max_task_retries=-1,
            runtime_env={"env_vars": KEPT_HEAP_ENV | INLINE_ACTIVATIONS_ENV}
        ).remote(own, experts, self.dtype, self.quantize, self.model_id)

    def _wait_loaded(self, handles: list, loading: list[int] | None = None) -> None:
        """Wait for the actors `loading` (indices in `handles`; default: all) to load."""
        loading = range(len(handles)) if loading is None else loading
        try:
            # A load failure surfaces here, not mid-request.
            infos = asyncio.run(all_loaded([self._loaded(i, handles[i]) for i in loading], self._loading))
            if (smaller := smaller_gpus(dict(zip(loading, infos)), self.gpu_memory)) is not None:
                log.warning("%s", smaller)
            with self._lock:
                if not self._released:
                    self.state, self.loaded = "ready", True
        except BaseException as e:
            self._failed(e)
        finally:
            self._done.set()

    async def _loaded(self, index: int, handle) -> dict:
        """Actor `index`'s info, which it answers once loaded; where its process died as it loaded until Ray gave it
        up, an error that names it and says why (the first sentence of Ray's reason, its message's last line)."""
        try:
            return await handle.info.remote()
        except ray.exceptions.ActorDiedError as e:
            if e.actor_init_failed:  # its own error (a bad checkpoint, ...), which names what
                raise
            spec = self.placement.actors[index]
            reason = str(e).splitlines()[-1].split(". ")[0].rstrip(".")
            raise ExpertLoadError(
                f"expert actor {index} (node {spec.node + 1} of {self.placement.nodes} in the placement, "
                f"{len(spec.experts)} experts) died as it loaded and is not started again: {reason} (Ray starts a "
                f"lost actor again {ACTOR_RESTARTS} times; one killed for memory as it reads its weights, say, dies "
                "each time)") from e

    def _loading(self, loaded: int, total: int) -> None:
        """Say how far the load has come: an actor slow to load, or killed as it reads its weights and started again
        by Ray, shows as the count that stops."""
        self._say(f"loading {total} expert actors ({loaded} loaded)")

    def _say(self, state: str) -> None:
        """The fleet's state, unless it was released meanwhile (which says so, and stays)."""
        with self._lock:
            if not self._released:
                self.state = state

    def _failed(self, error: BaseException) -> None:
        if self._released:  # stopped while starting: what failed is the stop's doing (its group or actors gone)
            return
        self.error, self._error_traceback = error, error.__traceback__
        log.error("expert fleet failed: %s", error)
        self.release()

    def replace_dead(self, fleet_id: str) -> bool:
        """Start again, under a new fleet id, the actors handed out as `fleet_id` that are dead for good (Ray starts
        again an actor that dies, but not one whose restart failed, or that was killed for good), the others kept.
        Whether the actors of `fleet_id` are no longer the fleet's: it started dead ones again, now or at another
        front's call. Its fronts call it when a call finds an actor dead and the fleet still hands it out."""
        with self._lock:
            if fleet_id != self.fleet_id:
                return True
            if self._released or self.state != "ready":
                return False  # stopping, or loading
            handles = list(self.handles)
        dead = dead_for_good(handles)
        with self._lock:
            if fleet_id != self.fleet_id:
                return True
            if not dead or self._released:
                return False
            log.warning("expert actors %s are dead for good; starting them again", dead)
            fresh = {}
            try:  # all of them or none: the fronts take up the set by its fleet id
                for i in dead:
                    fresh[i] = self._new_actor(self.placement.actors[i])
            except Exception:
                _kill(list(fresh.values()))
                raise
            self.handles = handles = [fresh.get(i, handle) for i, handle in enumerate(self.handles)]
            self.fleet_id, self.state = uuid.uuid4().hex, f"loading {len(dead)} expert actors again"
            self._done.clear()
        # The new actors alone: one of the others lost meanwhile is Ray's to start again, or the fronts' to report.
        threading.Thread(target=self._wait_loaded, args=(handles, dead), name="switch-serve-fleet",
                         daemon=True).start()
        return True

    def release(self) -> None:
        """Stop the actors and free the placement groups' reservations at once, rather than when Ray notices the
        fleet is gone."""
        with self._lock:
            self._released = True
            _kill(self.handles)
            self._remove_groups()
            self.handles = []
            if self.error is None:
                self.state = "released"


def dead_for_good(handles: list, timeout_s: float = 1.0) -> list[int]:
    """The indices of the actors that are dead and will not be started again; one restarting, busy beyond
    `timeout_s`, or whose answer is an error of its own, is not. A ping left unanswered is not cancelled: an actor
    restarting answers it once back, in microseconds, and with the links' pings cancelled, an actor moved to another
    node with its node lost did not answer the front's calls within the restart timeout in 4 of 9 runs of the
    multinode test (none of 6 without)."""
    pings = [handle.info.remote() for handle in handles]
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
    answered, dead = set(ready), []
    for i, ping in enumerate(pings):
        try:
            if ping in answered:
                ray.get(ping)
        except ray.exceptions.ActorUnavailableError:
            pass
        except ray.exceptions.RayActorError:
            dead.append(i)
        except Exception as e:  # it answered, with an error of its call's own: alive
            log.warning("expert actor %d answered its ping with an error: %s", i, e)
    return dead


# How much smaller than planned a GPU may be without a word: an "80 GB" card holds 79.2 GiB, and the default is 80GiB.
GPU_SIZE_SLACK = 0.95


def smaller_gpus(infos: dict[int, dict], planned_bytes: int | None) -> str | None:
    """What to say where the actors' GPUs (`infos`: each actor's info by its index) are smaller than the plan took
    them to be (`gpu_memory`): their experts then leave less room for activations than planned, and a later batch
    may run out of memory."""
    if not planned_bytes:
        return None
    small = [i for i, info in infos.items()
             if info["gpu_bytes"] is not None and info["gpu_bytes"] < GPU_SIZE_SLACK * planned_bytes]
    if not small:
        return None
    least = min(infos[i]["gpu_bytes"] for i in small)
    return (f"gpu_memory: the experts were planned for GPUs of {planned_bytes / 2**30:.1f} GiB, but expert actors "
            f"{small} have GPUs of {least / 2**30:.1f} GiB or less: plan with their size")


async def all_loaded(calls: list, progress, every_s: float = ROOM_POLL_S) -> list[dict]:
    """The answers of `calls` (each actor's `info`, which it answers once loaded), in order; the first failure
    raised at once. Every `every_s`, `progress(answered, len(calls))`. Awaited rather than ray.get: Ray warns about
    blocking gets in a process that runs an event loop (Serve's)."""
    async def answer(call):
        return await call

    tasks = [asyncio.ensure_future(answer(call)) for call in calls]
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=every_s, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
            if not pending:
                return [task.result() for task in tasks]
            progress(len(done), len(tasks))
    finally:
        for task in tasks:
            task.cancel()


def _kill(handles: list) -> None:
    """Kill each actor: one that fails to (its GCS call, say) leaves the others and the groups to be freed after."""
    for h in handles:
        try:
            ray.kill(h)
        except Exception as e:
            log.warning("killing expert actor %s failed: %s", h, e)


def moving(groups: list) -> str:
    """What the actors of the groups (a planned node's each) that Ray is moving wait for, or "" where none is."""
    unplaced = [node for node, group in enumerate(groups)
                if placement_group_table(group).get("state") == "RESCHEDULING"]
    if not unplaced:
        return ""
    return (f"the expert actors of node {', '.join(str(node + 1) for node in unplaced)} of {len(groups)} wait for room "
            f"on another node (theirs was lost); {cluster_has()}")


def group_name(fleet: str, node: int) -> str:
    return f"{fleet}-node{node}"


def created_groups() -> list[str]:
    """The names of the cluster's placement groups that hold their room."""
    return [info["name"] for info in placement_group_table().values() if info["state"] == "CREATED"]


def of_family(group: str, family: str) -> bool:
    """Whether `group` (a placement group's name) is a node's of a fleet named "{family}-{version}"."""
    fleet, _, node = group.rpartition("-node")
    version = fleet.removeprefix(f"{family}-")
    return node.isdigit() and fleet.startswith(f"{family}-") and version != "" and "-" not in version


def _remove_groups_named(fleet: str, nodes: int) -> None:
    for node in range(nodes):
        try:
            remove_placement_group(get_placement_group(group_name(fleet, node)))
        except ValueError:  # none
            pass


# The label of every Ray node that names it.
NODE_ID_LABEL = "ray.io/node-id"


def placed_on(group) -> str:
    """The Ray node of a placed group's bundles (all on one node), or "" where it has none."""
    return placement_group_table(group)["bundles_to_node_id"].get(0) or ""


def not_on(nodes: list[str]) -> dict[str, str]:
    """A bundle's label selector: on none of `nodes` (Ray node ids)."""
    return {NODE_ID_LABEL: f"!in({','.join(nodes)})"}


def alive_node_resources() -> list[dict[str, float]]:
    """What each live node of the running Ray cluster offers (CPUs, GPUs, custom resources)."""
    skip = ("memory", "object_store_memory")
    return [{k: v for k, v in n["Resources"].items() if k not in skip and not k.startswith("node:")}
            for n in ray.nodes() if n["Alive"]]


CLUSTER_HAS = "the cluster has"  # how a message says what the live nodes offer (one that says it needs it once)


def cluster_has() -> str:
    """What the live nodes offer, as a message says it."""
    return f"{CLUSTER_HAS} {alive_node_resources()}"


def fleet_name(checkpoint: SwitchCheckpoint, config: PlacementConfig, dtype: str, quantize: str) -> str:
    """What a fleet serves, as its fronts ask for it: the same name, the same experts in the same actors."""
    digest = hashlib.sha1(repr((str(checkpoint.path), config.for_fleet(), dtype, quantize)).encode()).hexdigest()[:12]
    return f"experts-{digest}"


def start_fleet(checkpoint: SwitchCheckpoint, config: PlacementConfig, dtype: str, quantize: str = "none",
                placement: Placement | None = None):
    """An ExpertFleet as a Ray actor on this node (the Python API's front), started again by Ray if its process
    dies, with `placement` where the caller has made it already (see served_placement). Returns at once; its
    `actors` method waits for the load."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # Its own name, kept across restarts.
    name = f"{fleet_name(checkpoint, config, dtype, quantize)}-{uuid.uuid4().hex[:8]}"
    return ray.remote(ExpertFleet).options(num_cpus=0, scheduling_strategy=here, max_restarts=-1,
                                           max_concurrency=FLEET_CALLERS).remote(
        checkpoint, config, dtype, quantize, name, placement)


def stop_fleet(fleet) -> None:
    """Release a fleet actor's expert actors and placement group, then the fleet itself. A fleet that is restarting
    or dead releases nothing: its actors die with it, and its group goes with the job that made it."""
    try:
        ray.get(fleet.release.remote())
    except ray.exceptions.RayActorError:
        pass
    finally:
        ray.kill(fleet, no_restart=True)
