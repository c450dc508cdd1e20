"""The front's link to its expert fleet, against a stand-in fleet: it takes the actors once they have loaded,
notices within seconds that the fleet started again (with new actors) even when no call fails, and says why it
is not ready meanwhile."""

from __future__ import annotations

import time
from types import SimpleNamespace

from reference import wait_until

from experts.fleet import FleetActors
from router_service import engine
from router_service.engine import LINK_CHECK_S, ExpertLink

SERVES = "experts-0123456789ab"  # the config the link's front serves
PLACED = SimpleNamespace(owners=lambda: {})  # a fleet's placement of its actors


class StandInFleet:
    """Answers `fleet.actors.remote(wait_s).result()` with `view`, or raises `error`, and
    `fleet.replace_dead.remote(fleet_id).result()` with `replacing` (whether it starts dead actors again)."""

    def __init__(self, view: FleetActors):
        self.view, self.error, self.replacing = view, None, False
        self.actors = self
        self.replace_dead = SimpleNamespace(remote=lambda fleet_id: SimpleNamespace(
            result=lambda timeout_s: self.replacing))

    def remote(self, wait_s: float):
        time.sleep(0.02)  # a real fleet waits for its load; this one must not spin the link
        if self.error is not None:
            raise self.error
        return SimpleNamespace(result=lambda timeout_s: self.view)


def stand_in_dispatcher() -> SimpleNamespace:
    """What the link uses of a dispatcher: the actors it was given."""
    dispatcher = SimpleNamespace(actors=[], on_lost=None, actors_dead=lambda: False)
    dispatcher.use = lambda actors, local, stacks, owners: setattr(dispatcher, "actors", actors)
    return dispatcher


def test_link_follows_its_fleet():
    """Fails if the link only learns of a new fleet from a failed call (the check in ExpertLink._run)."""
    fleet = StandInFleet(FleetActors([], "waiting 10 s for room for 2 node(s)", "first", SERVES))
    dispatcher = stand_in_dispatcher()
    link = ExpertLink(fleet, SERVES, dispatcher)
    try:
        wait_until(lambda: link.status.startswith("waiting 10 s for room"), "the link waiting for room", 5)
        assert not link.ready.is_set()

        fleet.view = FleetActors(["actor 0", "actor 1"], "ready", "first", SERVES, PLACED)
        assert link.wait(5) and dispatcher.actors == ["actor 0", "actor 1"] and link.status == "ready"

        fleet.view = FleetActors([], "loading 2 expert actors", "second", SERVES)  # the fleet died and started again
        wait_until(lambda: not link.ready.is_set(), "the link not ready", LINK_CHECK_S + 2)
        wait_until(lambda: link.status == "loading 2 expert actors", "the link loading", 5)
        fleet.view = FleetActors(["actor 2", "actor 3"], "ready", "second", SERVES, PLACED)
        assert link.wait(5) and dispatcher.actors == ["actor 2", "actor 3"]

        dispatcher.actors_dead = lambda: True  # the fleet died; Serve has not noticed yet
        fleet.error = TimeoutError()
        wait_until(lambda: not link.ready.is_set(), "the link not ready", LINK_CHECK_S + 2)
        wait_until(lambda: "the expert fleet did not answer" in link.status,
                   "the link saying the fleet did not answer", 2)

        fleet.error, dispatcher.actors_dead = None, lambda: False
        assert link.wait(LINK_CHECK_S + 2)  # the same fleet again: the same actors
        # A call to actors replaced already (a layer's calls out as the link took these up) is no news: the link
        # would take these for lost, and refuse requests until it had looked again.
        dispatcher.on_lost(RuntimeError("actor 0 died"), ["actor 0", "actor 1"])
        assert link.ready.is_set()
        dispatcher.on_lost(RuntimeError("actor 2 died"), ["actor 2", "actor 3"])  # a call found an actor dead
        assert not link.ready.is_set() and "actor 2 died" in link.status
        assert link.wait(5)

        # The fleet started again and loaded its new actors between two checks: the old ones were its own.
        fleet.view = FleetActors(["actor 4", "actor 5"], "ready", "third", SERVES, PLACED)
        wait_until(lambda: dispatcher.actors == ["actor 4", "actor 5"], "the new actors taken up", 2 * LINK_CHECK_S + 2)
        assert link.ready.is_set()

        # An actor dead for good, which the fleet still hands out: the link asks it to start that one again.
        fleet.replacing = True
        dispatcher.on_lost(RuntimeError("actor 5 killed"), ["actor 4", "actor 5"])
        wait_until(lambda: "their fleet is starting them again" in link.status,
                   "the link saying the fleet starts them again", 5)
        fleet.replacing, fleet.view = False, FleetActors(["actor 4", "actor 6"], "ready", "fourth", SERVES, PLACED)
        assert link.wait(2 * LINK_CHECK_S + 2) and dispatcher.actors == ["actor 4", "actor 6"]
    finally:
        link.close()


def test_link_stops_serving_while_its_fleet_waits_for_room_for_lost_actors():
    """A node with expert actors lost and no other with room for their group: their calls wait (up to
    restart_timeout_s), so the front takes no new requests (NOT_SERVING, saying why) until the fleet's groups are
    placed again, then serves with the same actors. Fails if the link stays ready, or asks its fleet without pause
    meanwhile."""
    fleet = StandInFleet(FleetActors(["actor 0", "actor 1"], "ready", "first", SERVES, PLACED))
    dispatcher = stand_in_dispatcher()
    link = ExpertLink(fleet, SERVES, dispatcher)
    asked = counted_looks(fleet)
    try:
        assert link.wait(5)
        waiting = "the expert actors of node 2 of 2 wait for room on another node (theirs was lost)"
        fleet.view = fleet.view._replace(moving=waiting)
        wait_until(lambda: not link.ready.is_set(), "the link not ready", LINK_CHECK_S + 2)
        wait_until(lambda: link.status == waiting, "the link waiting", 5)
        asked.clear()
        time.sleep(LINK_CHECK_S + 0.5)
        assert len(asked) <= 2 and not link.ready.is_set()
        fleet.view = fleet.view._replace(moving="")
        assert link.wait(LINK_CHECK_S + 2) and dispatcher.actors == ["actor 0", "actor 1"] and link.status == "ready"
    finally:
        link.close()


class StandInLate:
    """engine.LateActors, whose answer the test sets: None (some yet to answer), True (all alive), False (one dead)."""

    answer: bool | None = None
    made: list = []

    def __init__(self, actors: dict):
        self.actors, self.pings = actors, {}
        StandInLate.made.append(self)

    def add(self, actors: dict) -> None:
        self.actors = actors | self.actors

    def answered(self, timeout_s: float) -> bool | None:
        time.sleep(0.02)  # a real one waits for its pings
        return StandInLate.answer


def test_late_actors_added_are_pinged_once():
    """Actors told late while others are waited for are pinged too; one already waited for is not pinged again.
    Fails if an added actor is not waited for."""
    pinged = []

    def actor(name):
        return SimpleNamespace(info=SimpleNamespace(remote=lambda: pinged.append(name) or f"ping {name}"))

    late = engine.LateActors({1: actor("actor 1")})
    late.add({1: actor("actor 1 again"), 0: actor("actor 0")})
    assert pinged == ["actor 1", "actor 0"] and late.pings == {1: "ping actor 1", 0: "ping actor 0"}


def test_a_front_with_late_actors_waits_for_them_before_anything_else(monkeypatch):
    """Calls unanswered past restart_timeout_s: the front serves nothing until those actors answer, and meanwhile
    looks at nothing else (a draining front whose fleet handle answers for another config stayed down for good
    when it did); once they answer it serves again with the same actors, not taken up anew; late actors told while
    it waits (another micro-batch's) are waited for too. A loss told meanwhile,
    or a late actor found dead, sends it to its fleet's actors (one dead for good: the fleet starts it again)."""
    monkeypatch.setattr(engine, "LateActors", StandInLate)
    monkeypatch.setattr(StandInLate, "made", [])
    fleet = StandInFleet(FleetActors(["actor 0", "actor 1"], "ready", "first", SERVES, PLACED))
    dispatcher, taken = stand_in_dispatcher(), []
    use = dispatcher.use
    dispatcher.use = lambda *args, **kwargs: taken.append(args[0]) or use(*args, **kwargs)
    link = ExpertLink(fleet, SERVES, dispatcher)
    late = RuntimeError("expert actors [1] did not answer decoder layer 1 within 60 s (restarting, ...)")
    try:
        assert link.wait(5) and taken == [["actor 0", "actor 1"]]
        dispatcher.on_late(late, [1], ["actor 0", "actor 1"])
        assert not link.ready.is_set() and StandInLate.made[-1].actors == {1: "actor 1"}
        assert link.status == f"{late}; waiting for them to answer"
        dispatcher.on_late(late, [0], ["actor 0", "actor 1"])  # another micro-batch's layer of the step: waited for too
        assert len(StandInLate.made) == 1 and StandInLate.made[-1].actors == {0: "actor 0", 1: "actor 1"}
        fleet.view = FleetActors([], "ready", "other", "experts-other-config")  # as during a config change
        looks = counted_looks(fleet)
        time.sleep(LINK_CHECK_S + 0.5)
        assert looks == [] and not link.ready.is_set() and link.status.endswith("waiting for them to answer")
        StandInLate.answer = True
        assert link.wait(5) and link.status == "ready" and taken == [["actor 0", "actor 1"]]

        StandInLate.answer = None
        fleet.view = FleetActors(["actor 0", "actor 1"], "ready", "first", SERVES, PLACED)
        dispatcher.on_late(late, [1], ["actor 0", "actor 1"])
        dispatcher.on_lost(RuntimeError("actor 0 died"), ["actor 0", "actor 1"])  # told while late
        assert link.wait(LINK_CHECK_S + 2) and len(taken) == 2  # taken up again from the fleet's answer

        StandInLate.answer = False  # one of the late actors is dead for good
        fleet.replacing = True
        dispatcher.on_late(late, [1], ["actor 0", "actor 1"])
        wait_until(lambda: "their fleet is starting them again" in link.status,
                   "the link saying the fleet starts them again", 5)
        assert not link.ready.is_set()
    finally:
        StandInLate.answer = None
        link.close()


def test_link_takes_only_the_actors_of_a_fleet_serving_its_config():
    """While a config change is under way, the fronts of one config may ask the other's fleet: its actors place the
    experts otherwise. Fails if the link takes them (the check of `serves` in ExpertLink._run)."""
    fleet = StandInFleet(FleetActors(["new 0", "new 1", "new 2"], "ready", "new", "experts-new-plan", PLACED))
    dispatcher = stand_in_dispatcher()
    link = ExpertLink(fleet, SERVES, dispatcher)
    try:
        wait_until(lambda: "serves another config (experts-new-plan" in link.status,
                   "the link saying the fleet serves another config", 5)
        assert not link.ready.is_set() and dispatcher.actors == []

        fleet.view = FleetActors(["actor 0", "actor 1"], "ready", "old", SERVES, PLACED)
        assert link.wait(5) and dispatcher.actors == ["actor 0", "actor 1"]
        fleet.view = FleetActors(["new 0", "new 1", "new 2"], "ready", "new", "experts-new-plan", PLACED)
        looks = counted_looks(fleet)
        # a draining front keeps its fleet's actors
        wait_until(lambda: len(looks) >= 2, "two looks at the fleet", 2 * LINK_CHECK_S + 2)
        assert link.ready.is_set() and dispatcher.actors == ["actor 0", "actor 1"]
    finally:
        link.close()


def counted_looks(fleet: StandInFleet) -> list[float]:
    """The link's looks at `fleet` from now on, one item each."""
    looks, remote = [], fleet.remote
    fleet.remote = lambda wait_s: looks.append(wait_s) or remote(wait_s)
    return looks


def test_a_draining_front_keeps_its_actors_while_the_fleet_replacing_theirs_serves_the_same():
    """A new fleet of the same experts (a change of the served model's name makes a new version; the same version,
    rebuilt, waits for the old one to stop, and says so before it has looked): the old fleet keeps its actors for its
    fronts until they have drained. Fails if the front drops them once the new fleet answers (the check of the fleet's
    name and of `replacing` in ExpertLink._check), and so refuses calls it could serve."""
    fleet = StandInFleet(FleetActors(["actor 0", "actor 1"], "ready", "old", SERVES, PLACED, name="app-v1"))
    dispatcher = stand_in_dispatcher()
    link = ExpertLink(fleet, SERVES, dispatcher)
    try:
        assert link.wait(5)
        for view in (FleetActors([], "loading 2 expert actors", "new", SERVES, name="app-v2"),
                     FleetActors(["new 0", "new 1"], "ready", "new", SERVES, PLACED, name="app-v2"),
                     FleetActors([], "waiting for the fleet it replaces, of the same config, to stop", "rebuilt",
                                 SERVES, behind_predecessor=True, name="app-v1", replacing=True),
                     FleetActors([], "starting", "rebuilt", SERVES, name="app-v1", replacing=True)):
            fleet.view, looks = view, counted_looks(fleet)
            wait_until(lambda looks=looks: len(looks) >= 2, "two looks at the fleet", 2 * LINK_CHECK_S + 2)
            assert link.ready.is_set() and dispatcher.actors == ["actor 0", "actor 1"], view

        fleet.view = FleetActors(["new 0", "new 1"], "ready", "new", SERVES, PLACED, name="app-v2")
        # The old fleet released them (its fronts have stopped): a front left takes the new ones.
        dispatcher.actors_dead = lambda: dispatcher.actors == ["actor 0", "actor 1"]
        wait_until(lambda: dispatcher.actors == ["new 0", "new 1"] and link.ready.is_set(),
                   "the new fleet's actors taken up", LINK_CHECK_S + 2)
    finally:
        link.close()


def test_a_fleet_call_that_times_out_is_cancelled():
    """Left queued for a fleet starting again, a timed-out call would hold one of its threads once it starts."""
    import pytest

    from router_service.engine import call

    class SlowResponse:  # a Serve deployment response that does not answer in time
        cancelled = False

        def result(self, timeout_s):
            raise TimeoutError(f"no answer within {timeout_s} s")

        def cancel(self):
            self.cancelled = True

    response = SlowResponse()
    with pytest.raises(TimeoutError):
        call(response, 0.1)
    assert response.cancelled


def test_link_outlives_a_failure_to_take_up_the_actors():
    """Taking up the actors can fail in the front (no memory for its copies of the experts it computes, say): the
    link says why and tries again. Fails if the failure ends the link's thread, which leaves the front without
    experts for good."""
    fleet = StandInFleet(FleetActors(["actor 0"], "ready", "first", SERVES, PLACED))
    dispatcher = stand_in_dispatcher()
    failures = [RuntimeError("out of memory\nmore detail")]

    def local_experts(actors):
        if failures:
            raise failures.pop()
        return {}, {}

    link = ExpertLink(fleet, SERVES, dispatcher, local_experts)
    try:
        wait_until(lambda: "taking up the expert actors failed (out of memory)" in link.status,
                   "the link saying its take-up failed", 5)
        assert not link.ready.is_set()
        assert link.wait(LINK_CHECK_S + 2) and dispatcher.actors == ["actor 0"] and link.status == "ready"
    finally:
        link.close()


def test_the_front_places_its_experts_as_its_fleet_did():
    """Packed for the cluster's CPUs, the placement depends on when it is made: a front started after the cluster
    grew would pack otherwise than its fleet did. The link hands the dispatcher the fleet's placement with its
    actors. Fails if the front routes by a placement of its own."""
    fleet_placement = SimpleNamespace(owners=lambda: {("encoder", 1): {0: [1], 1: [0]}})
    fleet = StandInFleet(FleetActors(["actor 0", "actor 1"], "ready", "first", SERVES, fleet_placement))
    dispatcher, given = stand_in_dispatcher(), []
    dispatcher.use = lambda actors, local, stacks, owners: given.append(owners)
    link = ExpertLink(fleet, SERVES, dispatcher)
    try:
        assert link.wait(5)
        assert given == [{("encoder", 1): {0: [1], 1: [0]}}] and link.placement is fleet_placement
    finally:
        link.close()


def test_link_says_whether_its_fleet_waits_behind_the_one_it_replaces():
    """The fleet's word that it waits for room the fleet it replaces holds reaches the link, whose front then starts
    without its experts (SwitchCluster.wait_for_experts), and goes once the room is free. Fails if the link drops it."""
    fleet = StandInFleet(FleetActors([], "waiting 10 s for room for node 1 of 2", "new", SERVES,
                                     behind_predecessor=True))
    link = ExpertLink(fleet, SERVES, stand_in_dispatcher())
    try:
        wait_until(lambda: link.behind_predecessor, "the link behind its predecessor", 5)
        fleet.view = FleetActors([], "loading 2 expert actors", "new", SERVES)
        wait_until(lambda: not link.behind_predecessor, "the link no longer behind its predecessor", 5)
        assert link.status == "loading 2 expert actors"
    finally:
        link.close()
