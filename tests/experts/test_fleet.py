"""The expert fleet's own state, without Ray: what it tells its fronts and Serve when its load fails."""

from __future__ import annotations

import traceback
import types

import pytest
from reference import wait_until

from cluster.testing import tiny_config, write_random_checkpoint
from experts import fleet
from experts.checkpoint import SwitchCheckpoint
from experts.placement import Placement, PlacementConfig, PlacementError


def test_a_fleet_whose_load_failed_says_so_to_its_fronts_and_to_serve(tmp_path, monkeypatch):
    """The fronts get the load's error (and report it, rather than 'loading' for good), and Serve's health check
    fails, so that Serve starts a new fleet, which tries again."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))

    def no_room(placement, resources):
        raise RuntimeError("no node has room for the expert actors")

    monkeypatch.setattr(fleet, "actor_cpus", no_room)
    failed = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32")
    with pytest.raises(RuntimeError, match="no node has room"):
        failed.actors(wait_s=30)
    with pytest.raises(RuntimeError, match="no node has room"):
        failed.check_health()


def test_expert_actors_leave_a_share_of_the_weakest_node_for_a_front(monkeypatch):
    """Four actors a node, the weakest node of 3 CPUs: each actor asks for a fifth of them, one fifth left for a front
    (fronts ask for no CPU); never more than one CPU. Fails if the actors split the node's CPUs among themselves
    alone, or size themselves by another node than the weakest."""
    placement = Placement.packed(tiny_config(num_experts=8), 1, nodes=2)
    assert [sum(1 for a in placement.actors if a.node == n) for n in range(2)] == [4, 4]
    monkeypatch.setattr(fleet, "node_cpus_largest_first", lambda needs: [64.0, 3.0])
    assert fleet.actor_cpus(placement, {}) == 0.6
    monkeypatch.setattr(fleet, "node_cpus_largest_first", lambda needs: [64.0, 64.0])
    assert fleet.actor_cpus(placement, {}) == 1.0


def nodes(*resources: dict) -> list[dict]:
    """Live nodes as `ray.nodes()` lists them."""
    return [{"Alive": True, "Resources": r, "NodeID": str(i)} for i, r in enumerate(resources)]


def test_expert_actors_are_sized_by_the_nodes_that_could_hold_them(monkeypatch):
    """Actors on GPUs, or asking for a custom resource, are sized by the CPUs of the nodes that have it, not by
    larger nodes that could never hold them: four actors sharing each of two GPUs on nodes of 2 CPUs and 1 GPU, beside
    CPU-only nodes of 96, ask for a fifth of 2 CPUs each (a bundle of 4 CPUs, one each, would wait forever). Fails
    if the nodes without the resource count."""
    cluster = [{"Alive": True, "Resources": r} for r in
               ({"CPU": 96.0}, {"CPU": 96.0}, {"CPU": 2.0, "GPU": 1.0, "accel": 1.0}, {"CPU": 2.0, "GPU": 1.0})]
    monkeypatch.setattr(fleet.ray, "nodes", lambda: cluster)
    on_gpus = PlacementConfig(gpus=2, nodes=2, actors_per_gpu=4).place(tiny_config(num_experts=8), "fp32")
    assert fleet.actor_cpus(on_gpus, {}) == 0.4
    assert fleet.bundles(on_gpus, 0.4, {}) == [[{"CPU": 1.6, "GPU": 1.0}]] * 2
    packed = Placement.packed(tiny_config(num_experts=8), 4)  # two actors on one node
    assert fleet.actor_cpus(packed, {}) == 1.0
    assert fleet.actor_cpus(packed, {"accel": 0.5}) == 0.6666  # rounded down: two ask for no more than 2
    monkeypatch.setattr(fleet.ray, "is_initialized", lambda: True)
    assert fleet.for_cluster(PlacementConfig(actor_resources={"accel": 0.5})).cpus == 2
    assert fleet.for_cluster(PlacementConfig()).cpus == 96


def test_the_default_packing_reads_the_cpus_of_the_running_cluster(monkeypatch):
    """With Ray up and neither gpus, experts_per_actor nor cpus set, the packing is for the CPUs of the `nodes`
    largest nodes; anything set, or no Ray, leaves the config as it is. Fails if the cluster's CPUs go unread."""
    monkeypatch.setattr(fleet, "node_cpus_largest_first", lambda needs: [6.0, 4.0, 2.0])
    monkeypatch.setattr(fleet.ray, "is_initialized", lambda: True)
    assert fleet.for_cluster(PlacementConfig()).cpus == 6
    assert fleet.for_cluster(PlacementConfig(nodes=2)).cpus == 10
    for given in (PlacementConfig(cpus=3), PlacementConfig(experts_per_actor=2), PlacementConfig(gpus=2)):
        assert fleet.for_cluster(given) == given
    monkeypatch.setattr(fleet.ray, "is_initialized", lambda: False)
    assert fleet.for_cluster(PlacementConfig()).cpus is None


def test_a_fleet_given_its_placement_does_not_plan_it_again(tmp_path, monkeypatch):
    """The Python API's front plans the placement (failing there, saying why, where it does not fit) and hands it
    to the fleet it starts, which keeps it. Fails if the fleet plans anew."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    checkpoint = SwitchCheckpoint.open(tmp_path)
    planned = fleet.served_placement(checkpoint, PlacementConfig(experts_per_actor=2), "float32")

    def planning(*args):
        raise AssertionError("planned again")

    monkeypatch.setattr(fleet, "served_placement", planning)
    # No actors: their start is not the point.
    monkeypatch.setattr(fleet, "actor_cpus", lambda placement, resources: 1 / 0)
    given = fleet.ExpertFleet(checkpoint, PlacementConfig(experts_per_actor=2), "float32", placement=planned)
    assert given.placement is planned
    with pytest.raises(ZeroDivisionError):
        given.actors(wait_s=30)


def test_a_failed_load_is_raised_with_its_own_traceback_each_time(tmp_path, monkeypatch):
    """The fronts ask a fleet whose load failed every 2 s, and Serve's health check as often: each time, the error it
    raises has the traceback it failed with and this call's frames, not every earlier call's. Fails if the stored
    error is raised as it is (its traceback grows by a call's frames each time)."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    monkeypatch.setattr(fleet, "actor_cpus", lambda placement, resources: 1 / 0)
    failed = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32")
    depths = []
    for ask in (failed.actors, failed.check_health) * 3:
        with pytest.raises(ZeroDivisionError) as raised:
            ask()
        depths.append(len(traceback.extract_tb(raised.value.__traceback__)))
    assert depths[2:] == depths[:2] * 2


def test_a_fleet_released_while_it_waits_for_room_reports_no_failure(tmp_path, monkeypatch):
    """Serve stops a fleet (a new config, the app deleted) while it waits for room for its placement group: the
    group removed under it is the stop's doing, not a failed load, so the fleet neither reports an error to its fronts
    and Serve's health check nor says anything but "released". Fails if the start thread records the failure."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    fleets = []

    class Group:
        def wait(self, timeout_s):
            fleets[0].release()
            raise RuntimeError("placement group removed")

    monkeypatch.setattr(fleet, "actor_cpus", lambda placement, resources: 1.0)
    monkeypatch.setattr(fleet, "_remove_groups_named", lambda name, nodes: None)
    monkeypatch.setattr(fleet, "placement_group", lambda bundles, **options: Group())
    monkeypatch.setattr(fleet, "remove_placement_group", lambda group: None)
    monkeypatch.setattr(fleet, "alive_node_resources", lambda: [{"CPU": 2.0}])

    class Starting(fleet.ExpertFleet):
        def __init__(self, *args, **kwargs):
            fleets.append(self)  # before its start thread asks for the group
            super().__init__(*args, **kwargs)

    stopped = Starting(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32")
    assert stopped.actors(wait_s=30).actors == []
    assert stopped.error is None and stopped.state == "released"
    stopped.check_health()


def test_a_fleet_released_as_it_finds_room_stays_released(tmp_path, monkeypatch):
    """Released just as its groups were placed: it says "released" from then on, not the load it would have begun
    (its fronts would report the experts loading for good). Fails if the start thread's state overwrites the stop's."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    monkeypatch.setattr(fleet, "actor_cpus", lambda placement, resources: 1.0)
    monkeypatch.setattr(fleet, "_remove_groups_named", lambda name, nodes: None)

    class ReleasedAsPlaced(fleet.ExpertFleet):
        def _reserve(self, wanted):
            self.release()
            return True

    stopped = ReleasedAsPlaced(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32")
    assert stopped.actors(wait_s=30).actors == [] and stopped.state == "released"


def test_gpus_smaller_than_the_plan_took_them_to_be_are_named():
    """The plan sized each GPU's experts by `gpu_memory`; actors on smaller cards are named once they have loaded
    (their experts leave less room for activations than planned). A card a little under it (an "80 GB" H100 holds
    79.2 GiB, against the default 80GiB), CPU actors and a plan without GPUs say nothing. Fails if the card's size goes
    unread."""
    gib = 2**30
    infos = dict(enumerate([{"gpu_bytes": 79.2 * gib}, {"gpu_bytes": 40 * gib}, {"gpu_bytes": None},
                            {"gpu_bytes": 24 * gib}]))
    said = fleet.smaller_gpus(infos, 80 * gib)
    assert said == ("gpu_memory: the experts were planned for GPUs of 80.0 GiB, but expert actors [1, 3] have GPUs of "
                    "24.0 GiB or less: plan with their size")
    assert fleet.smaller_gpus({0: infos[0], 2: infos[2]}, 80 * gib) is None
    assert fleet.smaller_gpus({5: infos[1]}, 80 * gib).startswith("gpu_memory: the experts were planned for GPUs of "
                                                                  "80.0 GiB, but expert actors [5] have")
    assert fleet.smaller_gpus(infos, None) is None


def test_a_fleet_says_so_once_its_actors_have_loaded_on_smaller_gpus_than_planned(tmp_path, monkeypatch, caplog):
    """The warning above, from a fleet planned for 80 GiB cards whose actors report 24 GiB ones as they load. Fails
    if the fleet does not look at what its actors report."""
    import logging

    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    checkpoint = SwitchCheckpoint.open(tmp_path)

    async def loaded_on_a_small_gpu():
        return {"gpu_bytes": 24 * 2**30}

    def start(self):
        self.handles = [types.SimpleNamespace(info=types.SimpleNamespace(remote=loaded_on_a_small_gpu))
                        for _ in self.placement.actors]
        self._wait_loaded(self.handles)

    monkeypatch.setattr(fleet.ExpertFleet, "_start", start)
    with caplog.at_level(logging.WARNING, logger="experts.fleet"):
        small = fleet.ExpertFleet(checkpoint, PlacementConfig(gpus=2), "float32", name="small",
                                  placement=Placement.packed(checkpoint.config, 2))
        assert small.actors(wait_s=30).status == "ready"
    assert ("gpu_memory: the experts were planned for GPUs of 80.0 GiB, but expert actors [0, 1] have GPUs of 24.0 GiB"
            in caplog.text)


def test_a_nodes_actors_never_ask_for_more_cpus_than_it_has(monkeypatch):
    """128 actors on a node of 2 CPUs each get 2/129 of a CPU rounded down to Ray's unit, so that their bundle asks
    for no more than the node has (rounded to hundredths, 0.02 each asked for 2.56, and the fleet waited for room for
    good); where not even Ray's least share is left for each, the placement is refused, saying what to change. Fails
    if a share is rounded up."""
    placement = Placement.packed(tiny_config(num_experts=128), 1)
    monkeypatch.setattr(fleet, "node_cpus_largest_first", lambda needs: [2.0])
    share = fleet.actor_cpus(placement, {})
    assert share == 0.0155
    assert fleet.bundles(placement, share, {})[0][0]["CPU"] <= 2.0
    monkeypatch.setattr(fleet, "node_cpus_largest_first", lambda needs: [0.01])
    with pytest.raises(PlacementError, match="128 expert actors on a node of 0.01 CPUs get no share.*experts_per"):
        fleet.actor_cpus(placement, {})
    monkeypatch.setattr(fleet, "node_cpus_largest_first", lambda needs: [])  # no node could hold them yet
    assert fleet.actor_cpus(placement, {}) == 0.0001


def test_a_fleet_stopped_before_it_asks_for_its_group_removes_its_predecessors(tmp_path, monkeypatch):
    """Ray started the fleet's process again and the Python API stops it at once, before the new one has asked for
    its placement group: the group its predecessor left (named as its own) is removed all the same, not left
    reserving the nodes' CPUs and GPUs until the driver's job ends. Fails if the stop skips the removal."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    fleets, removed, asked = [], [], []

    def sized_as_it_stops(placement, resources):
        fleets[0].release()
        return 1.0

    monkeypatch.setattr(fleet, "actor_cpus", sized_as_it_stops)
    monkeypatch.setattr(fleet, "_remove_groups_named", lambda name, nodes: removed.append((name, nodes)))
    monkeypatch.setattr(fleet, "placement_group", lambda *args, **kwargs: asked.append(args))

    class Starting(fleet.ExpertFleet):
        def __init__(self, *args, **kwargs):
            fleets.append(self)
            super().__init__(*args, **kwargs)

    stopped = Starting(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32",
                       name="experts-left-behind")
    assert stopped.actors(wait_s=30).actors == [] and stopped.state == "released"
    assert removed == [("experts-left-behind", 1)] and asked == []


def test_a_fleet_stopped_while_the_one_it_replaces_stops_leaves_that_ones_groups(tmp_path, monkeypatch):
    """Stopped (its app deleted, or deployed anew) while it waits for the fleet of its own name to stop: the groups of
    that name are the other's, whose actors its fronts still drain with. Fails if the stop removes them."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    removed = []
    monkeypatch.setattr(fleet, "PREDECESSOR_POLL_S", 0.01)
    monkeypatch.setattr(fleet, "actor_cpus", lambda placement, resources: 0.5)
    monkeypatch.setattr(fleet, "_remove_groups_named", lambda name, nodes: removed.append(name))
    monkeypatch.setattr(fleet.ExpertFleet, "_predecessor_stopping", lambda self: True)
    waiting = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32",
                                name="same")
    wait_until(lambda: waiting.behind_predecessor, "the fleet to wait behind the one it replaces")
    waiting.release()
    assert waiting.actors(wait_s=30).actors == [] and waiting.state == "released" and removed == []


def test_a_fleet_that_fails_to_start_an_actor_kills_those_it_started(tmp_path, monkeypatch):
    """Ray's control service failing as the third of four actors starts: the load fails, and the two started are
    killed, not left loading and holding their CPUs and GPUs until the fleet's process ends. Fails if the fleet keeps
    its actors only once all have started."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    started, killed = [], []

    def new_actor(self, spec):
        if len(started) == 2:
            raise RuntimeError("the GCS did not answer")
        started.append(f"actor {len(started)}")
        return started[-1]

    monkeypatch.setattr(fleet, "actor_cpus", lambda placement, resources: 1.0)
    monkeypatch.setattr(fleet, "_remove_groups_named", lambda name, nodes: None)
    monkeypatch.setattr(fleet.ExpertFleet, "_reserve", lambda self, wanted: True)
    monkeypatch.setattr(fleet.ExpertFleet, "_new_actor", new_actor)
    monkeypatch.setattr(fleet.ray, "kill", killed.append)
    failing = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=1), "float32")
    with pytest.raises(RuntimeError, match="the GCS did not answer"):
        failing.actors(wait_s=30)
    assert killed == started == ["actor 0", "actor 1"]


def test_a_processs_math_takes_no_more_threads_than_its_cores(monkeypatch):
    """Asked for 4 threads (switch-base-8's manifest sets --front-threads 4) on a machine of 2 cores, a front takes
    2; unasked, the CPUs Ray counts on its node, capped the same way. Fails if busy threads outnumber the cores."""
    monkeypatch.setattr(fleet.os, "sched_getaffinity", lambda pid: {0, 1})
    assert [fleet.compute_threads(n) for n in (1, 2, 4)] == [1, 2, 2]
    monkeypatch.setattr(fleet.ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "b"))
    monkeypatch.setattr(fleet.ray, "nodes", lambda: [{"NodeID": "a", "Resources": {"CPU": 1.0}},
                                                     {"NodeID": "b", "Resources": {"CPU": 8.0}}])
    assert fleet.compute_threads() == 2
    monkeypatch.setattr(fleet.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert fleet.compute_threads() == 8


def test_a_load_says_how_far_it_has_come_and_fails_at_its_first_failure():
    """While actors load, the fleet's state counts those loaded (an actor killed as it loads, again and again, shows
    as the count that stops), in the actors' order once all have answered; an actor whose load fails ends the wait at
    once, the others still loading. Fails if the wait says nothing until all have loaded."""
    import asyncio

    async def answers_after(seconds: float, answer):
        await asyncio.sleep(seconds)
        if isinstance(answer, Exception):
            raise answer
        return answer

    said = []
    infos = asyncio.run(fleet.all_loaded([answers_after(0.2, "second"), answers_after(0.0, "first")],
                                         lambda loaded, total: said.append((loaded, total)), every_s=0.05))
    assert infos == ["second", "first"] and said[0] == (1, 2) and set(said) == {(1, 2)}

    async def failing() -> float:
        began = asyncio.get_running_loop().time()
        with pytest.raises(RuntimeError, match="no such file"):
            await fleet.all_loaded([answers_after(3600, "never"), answers_after(0.05, RuntimeError("no such file"))],
                                   lambda loaded, total: None, every_s=0.01)
        return asyncio.get_running_loop().time() - began

    assert asyncio.run(failing()) < 5


def test_a_replacement_waits_for_the_new_actors_alone(tmp_path, monkeypatch):
    """The fleet starts again an actor dead for good and waits for it to load; another of its actors lost meanwhile
    (Ray's to start again, or the fronts' to report) does not fail the fleet as a load that failed. Fails if the
    replacement waits for every actor."""
    import ray

    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))

    class Actor:
        def __init__(self, answer):
            self.info = types.SimpleNamespace(remote=lambda: self.answered(answer))

        async def answered(self, answer):
            if isinstance(answer, BaseException):
                raise answer
            return answer

    lost_meanwhile, dead, new = (Actor(ray.exceptions.ActorDiedError()), Actor({"gpu_bytes": None}),
                                 Actor({"gpu_bytes": None}))

    def ready(self):
        self.handles, self.state = [lost_meanwhile, dead], "ready"
        self._done.set()

    monkeypatch.setattr(fleet.ExpertFleet, "_start", ready)
    monkeypatch.setattr(fleet, "dead_for_good", lambda handles: [1])
    monkeypatch.setattr(fleet.ExpertFleet, "_new_actor", lambda self, spec: new)
    serving = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32")
    assert serving.actors(wait_s=10).status == "ready"
    first = serving.fleet_id
    assert serving.replace_dead(first)
    # Another front found the same actor dead: the actors it holds are no longer the fleet's, and it looks again.
    monkeypatch.setattr(fleet, "dead_for_good", lambda handles: pytest.fail("looked for dead actors again"))
    assert serving.replace_dead(first)
    view = serving.actors(wait_s=10)
    assert view.status == "ready" and view.actors == [lost_meanwhile, new] and serving.error is None


def test_a_replacement_that_fails_to_start_an_actor_changes_nothing(tmp_path, monkeypatch):
    """Two actors dead for good, the second's replacement failing to start: the fleet hands out the same set under
    the same id (fronts trust a set by its id), and kills the replacement it started; the front's next call tries
    again. Fails if the set is left half replaced."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    old, started, killed = ["a", "b", "c", "d"], [], []

    def ready(self):
        self.handles, self.state = list(old), "ready"
        self._done.set()

    def new_actor(self, spec):
        if started:
            raise RuntimeError("the GCS did not answer")
        started.append(f"new {sorted(spec.experts)}")
        return started[-1]

    monkeypatch.setattr(fleet.ExpertFleet, "_start", ready)
    monkeypatch.setattr(fleet, "dead_for_good", lambda handles: [0, 2])
    monkeypatch.setattr(fleet.ExpertFleet, "_new_actor", new_actor)
    monkeypatch.setattr(fleet.ray, "kill", killed.append)
    serving = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=1), "float32")
    first = serving.actors(wait_s=10).fleet_id
    with pytest.raises(RuntimeError, match="the GCS did not answer"):
        serving.replace_dead(first)
    view = serving.actors(wait_s=10)
    assert (view.actors, view.fleet_id, view.status) == (old, first, "ready") and killed == started


def test_a_fleet_says_which_nodes_actors_wait_for_room(tmp_path, monkeypatch):
    """Ray moves the group of a lost node to another with room, and its actors with it: while no node has room, the
    fleet hands out its actors saying so, which its fronts refuse new requests on. Fails if a group that Ray is
    moving goes unsaid."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    states = {"group 0": "CREATED", "group 1": "CREATED"}

    def ready(self):
        self.handles, self.groups, self.state = ["actor 0", "actor 1"], list(states), "ready"
        self._done.set()

    monkeypatch.setattr(fleet.ExpertFleet, "_start", ready)
    monkeypatch.setattr(fleet, "placement_group_table", lambda group: {"state": states[group]})
    monkeypatch.setattr(fleet, "alive_node_resources", lambda: [{"CPU": 2.0}])
    serving = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32")
    assert serving.actors(wait_s=10).moving == ""
    states["group 1"] = "RESCHEDULING"
    view = serving.actors(wait_s=10)
    assert view.actors == ["actor 0", "actor 1"] and view.status == "ready"
    assert view.moving == ("the expert actors of node 2 of 2 wait for room on another node (theirs was lost); the "
                           "cluster has [{'CPU': 2.0}]")
    states["group 1"] = "CREATED"
    assert serving.actors(wait_s=10).moving == ""


def test_each_nodes_group_is_kept_off_the_nodes_of_the_groups_before_it(tmp_path, monkeypatch):
    """A placement group per planned node, its bundles on one Ray node (STRICT_PACK), each with a label selector that
    keeps it off the nodes the groups before it took, so that the planned nodes are different Ray nodes; a group
    placed on a node lost meanwhile (placed nowhere) is waited for again. Fails if a group is created without the
    selector."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    asked = []

    class Group:
        def __init__(self, name):
            self.name, self.waits = name, 0

        def wait(self, timeout_s):
            self.waits += 1
            return True

    def create(bundles, **options):
        asked.append(options)
        return Group(options["name"])

    def table(group):
        # The second group's node is lost as it is placed: nowhere at its first look.
        node = "" if group.name.endswith("node1") and group.waits == 1 else f"id-{group.name[-5:]}"
        return {"bundles_to_node_id": {0: node}, "state": "CREATED"}

    monkeypatch.setattr(fleet, "actor_cpus", lambda placement, resources: 0.5)
    monkeypatch.setattr(fleet, "_remove_groups_named", lambda name, nodes: None)
    monkeypatch.setattr(fleet, "placement_group", create)
    monkeypatch.setattr(fleet, "placement_group_table", table)
    monkeypatch.setattr(fleet, "alive_node_resources", lambda: [{"CPU": 2.0}] * 3)
    monkeypatch.setattr(fleet.ExpertFleet, "_new_actor", lambda self, spec: spec)
    monkeypatch.setattr(fleet.ExpertFleet, "_wait_loaded", lambda self, handles: self._done.set())
    spread = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=1, nodes=3),
                               "float32", name="spread")
    assert spread.actors(wait_s=30).status == "loading 4 expert actors" and spread.error is None
    assert [group.waits for group in spread.groups] == [1, 2, 1]  # the second looked at again
    assert [a["name"] for a in asked] == ["spread-node0", "spread-node1", "spread-node2"]
    assert all(a["strategy"] == "STRICT_PACK" for a in asked)
    assert [a["bundle_label_selector"] for a in asked] == [
        None, [{"ray.io/node-id": "!in(id-node0)"}], [{"ray.io/node-id": "!in(id-node0,id-node1)"}]]


def test_a_fleet_holding_some_nodes_gives_them_back_where_the_next_finds_no_room(tmp_path, monkeypatch):
    """Two fleets starting at once might each hold a node the other needs: one that holds some of its groups and
    finds no room for the next within HOLDING_WAIT_S gives back all it holds and starts again after a pause (here:
    the second node's room comes once it has). Fails if it holds its first node for good."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    created, removed = [], []

    class Group:
        def __init__(self, name):
            self.name, self.round = name, sum(g.name == name for g in created)

        def wait(self, timeout_s):
            return not (self.name.endswith("node1") and self.round == 0)  # no room for node 1 the first time

    def create(bundles, **options):
        created.append(Group(options["name"]))
        return created[-1]

    monkeypatch.setattr(fleet, "ROOM_POLL_S", 0.01)
    monkeypatch.setattr(fleet, "HOLDING_WAIT_S", 0.05)
    monkeypatch.setattr(fleet, "actor_cpus", lambda placement, resources: 0.5)
    monkeypatch.setattr(fleet, "_remove_groups_named", lambda name, nodes: None)
    monkeypatch.setattr(fleet, "placement_group", create)
    monkeypatch.setattr(fleet, "remove_placement_group", removed.append)
    monkeypatch.setattr(fleet, "placement_group_table", lambda group: {"bundles_to_node_id": {0: group.name},
                                                                        "state": "CREATED"})
    monkeypatch.setattr(fleet, "alive_node_resources", lambda: [{"CPU": 2.0}] * 2)
    monkeypatch.setattr(fleet.ExpertFleet, "_new_actor", lambda self, spec: spec)
    monkeypatch.setattr(fleet.ExpertFleet, "_wait_loaded", lambda self, handles: self._done.set())
    held = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2, nodes=2),
                             "float32", name="held")
    assert held.actors(wait_s=30).status == "loading 2 expert actors"
    assert [(g.name, g.round) for g in created] == [("held-node0", 0), ("held-node1", 0), ("held-node0", 1),
                                                    ("held-node1", 1)]
    assert removed == created[:2] and held.groups == created[2:]


def test_a_ping_left_unanswered_is_left_for_the_actor_to_answer(monkeypatch):
    """Each front's link pings the actors every 2 s: a ping that an actor restarting (or busy) does not answer in time
    counts it alive and is left queued, not cancelled (see dead_for_good). Fails if it is cancelled."""
    handles = [types.SimpleNamespace(info=types.SimpleNamespace(remote=lambda i=i: f"ping {i}")) for i in range(3)]
    monkeypatch.setattr(fleet.ray, "wait", lambda pings, num_returns, timeout: (pings[:1], pings[1:]))
    monkeypatch.setattr(fleet.ray, "get", lambda ping: {"pid": 1})
    monkeypatch.setattr(fleet.ray, "cancel", lambda ping: pytest.fail(f"{ping} cancelled"))
    assert fleet.dead_for_good(handles) == []


def test_a_ping_answered_with_an_error_counts_its_actor_alive_and_the_rest_are_looked_at(monkeypatch):
    """An actor whose info() raises (a RayTaskError: it answered) is alive; the others are still looked at. Fails if
    the error escapes (the link's every look would then end there, never seeing its fleet start again)."""
    import ray

    handles = [types.SimpleNamespace(info=types.SimpleNamespace(remote=lambda i=i: i)) for i in range(3)]

    def get(ping):
        if ping == 0:
            raise ray.exceptions.RayTaskError("info", "Traceback ...", ValueError("no"))
        if ping == 2:
            raise ray.exceptions.RayActorError()
        return {"pid": 1}

    monkeypatch.setattr(fleet.ray, "wait", lambda pings, num_returns, timeout: (pings, []))
    monkeypatch.setattr(fleet.ray, "get", get)
    assert fleet.dead_for_good(handles) == [2]


def test_a_fleet_waiting_for_room_says_whether_the_fleet_it_replaces_holds_groups(tmp_path, monkeypatch):
    """A new config's fleet that finds no room while another version of its family (the fleet it replaces, keeping
    its actors for the old fronts) holds placement groups says so, which its fronts start on without their experts;
    another app's groups, its own, and groups already removed do not count. Fails if the fleet never says so (the
    new fronts would wait for room that the old fleet frees only once the old fronts have gone)."""
    import threading

    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    others = {"app-0123456789-node0": "CREATED", "app-x-experts-0123456789-node0": "CREATED",
              "app-abcdef0123-node0": "CREATED"}  # the old fleet's, another app's, its own
    placed = threading.Event()

    class Group:
        def __init__(self, name):
            self.name = name

        def wait(self, timeout_s):
            return placed.wait(timeout_s)

    def table(group=None):
        if group is not None:
            return {"bundles_to_node_id": {0: "node"}, "state": "CREATED"}
        return {i: {"name": name, "state": state} for i, (name, state) in enumerate(others.items())}

    monkeypatch.setattr(fleet, "ROOM_POLL_S", 0.01)
    monkeypatch.setattr(fleet, "actor_cpus", lambda placement, resources: 0.5)
    monkeypatch.setattr(fleet, "_remove_groups_named", lambda name, nodes: None)
    monkeypatch.setattr(fleet, "placement_group", lambda bundles, **options: Group(options["name"]))
    monkeypatch.setattr(fleet, "placement_group_table", table)
    monkeypatch.setattr(fleet, "alive_node_resources", lambda: [{"CPU": 2.0}])
    monkeypatch.setattr(fleet.ExpertFleet, "_new_actor", lambda self, spec: spec)
    monkeypatch.setattr(fleet.ExpertFleet, "_wait_loaded", lambda self, handles: self._done.set())
    waiting = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32",
                                name="app-abcdef0123", family="app")
    wait_until(lambda: waiting.actors().behind_predecessor, "the fleet to say it waits behind the one it replaces")
    others["app-0123456789-node0"] = "REMOVED"  # the old fleet released its room: another app's and its own left
    wait_until(lambda: not waiting.actors().behind_predecessor, "the fleet to stop waiting behind it")
    placed.set()
    assert waiting.actors(wait_s=30).status == "loading 2 expert actors"


@pytest.mark.parametrize("group, family, of", [
    ("app-0123456789-node0", "app", True), ("app-0123456789-node12", "app", True),
    ("app-x-experts-0123456789-node0", "app", False), ("app-0123456789", "app", False), ("app--node0", "app", False),
    ("other-0123456789-node0", "app", False)])
def test_a_fleets_family_is_its_apps_versions(group, family, of):
    assert fleet.of_family(group, family) is of


def test_a_fleet_counts_as_loaded_from_its_first_load_on_through_replacements(tmp_path, monkeypatch):
    """`loaded` (whose fronts a stopping fleet waits for) is false while the first load runs and where it failed,
    and true from the first load on, while a replacement of dead actors loads too (the others serve meanwhile).
    Fails if a replacement makes a stopping fleet release the actors that draining fronts still use."""
    import asyncio
    import threading

    import ray

    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    gate = {}

    class Actor:
        def __init__(self, name, answer):
            self.name, self.answer = name, answer
            self.info = types.SimpleNamespace(remote=self.answered)

        async def answered(self):
            await asyncio.to_thread(gate.setdefault(self.name, threading.Event()).wait)
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer

    def start(self):
        self.handles = [Actor(f"{self.name} 0", {"gpu_bytes": None}), Actor(f"{self.name} 1", {"gpu_bytes": None})]
        self._wait_loaded(self.handles)

    monkeypatch.setattr(fleet.ExpertFleet, "_start", start)
    monkeypatch.setattr(fleet, "dead_for_good", lambda handles: [1])
    monkeypatch.setattr(fleet.ExpertFleet, "_new_actor", lambda self, spec: Actor("new", {"gpu_bytes": None}))
    serving = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32",
                                name="serving")
    assert not serving.loaded and serving.actors().status.startswith("starting")
    for name in ("serving 0", "serving 1"):
        gate.setdefault(name, threading.Event()).set()
    assert serving.actors(wait_s=30).status == "ready" and serving.loaded
    assert serving.replace_dead(serving.fleet_id)
    assert serving.actors().status == "loading 1 expert actors again" and serving.loaded
    gate.setdefault("new", threading.Event()).set()
    assert serving.actors(wait_s=30).status == "ready" and serving.loaded

    monkeypatch.setattr(fleet.ExpertFleet, "release", lambda self: None)
    failing = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32",
                                name="failing")
    gate.setdefault("failing 0", threading.Event()).set()
    failing.handles[1].answer = ray.exceptions.RaySystemError("the GCS is gone")
    gate.setdefault("failing 1", threading.Event()).set()
    with pytest.raises(ray.exceptions.RaySystemError):
        failing.actors(wait_s=30)
    assert not failing.loaded


def test_a_fleet_removes_groups_of_its_name_only_once_the_fleet_it_replaces_has_stopped(tmp_path, monkeypatch):
    """While the fleet it replaces (of the same config, so its groups bear the same name) still stops, the new one
    waits, saying so, and removes nothing; then it removes what is left of them and goes on. Fails if it removes the
    groups of a fleet still keeping its actors for the fronts draining."""
    import threading

    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))
    stopped, removed = threading.Event(), []
    monkeypatch.setattr(fleet, "PREDECESSOR_POLL_S", 0.01)
    monkeypatch.setattr(fleet, "actor_cpus", lambda placement, resources: 0.5)
    monkeypatch.setattr(fleet, "_remove_groups_named", lambda name, nodes: removed.append(name))
    asked = []
    monkeypatch.setattr(fleet.ExpertFleet, "_predecessor_stopping",
                        lambda self: asked.append(1) or not stopped.is_set())
    monkeypatch.setattr(fleet.ExpertFleet, "_reserve", lambda self, wanted: self._done.set() or False)
    replacing = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32",
                                  name="same")
    assert replacing.actors().replacing  # the old fronts keep their actors from the start
    wait_until(lambda: replacing.state == "waiting for the fleet it replaces, of the same config, to stop",
               "the fleet to wait for the one it replaces")
    wait_until(lambda: len(asked) >= 50, "the fleet to ask fifty times whether the one it replaces still stops")
    assert removed == [] and replacing.actors().replacing  # it went on waiting, however many times it asked
    stopped.set()
    replacing._done.wait(30)
    assert removed == ["same"] and not replacing.replacing
