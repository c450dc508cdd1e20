"""Losing expert actors or the fleet that owns them, with the fault injected into a call in flight
(ExpertActor.inject_fault): a restarted actor costs a retry, not a request; one gone for good fails the requests
in its batch at once (UNAVAILABLE when served), and its fleet starts it again; a fleet that dies comes back by itself
with new actors, and leaves nothing of the old ones behind."""

from __future__ import annotations

import os
import time

import pytest
import ray
from ray.util.placement_group import placement_group_table
from reference import generate_in_background, hf_generate, wait_until

from experts import fleet
from experts.actor import ExpertActor
from experts.checkpoint import SwitchCheckpoint
from experts.fleet import fleet_name
from experts.placement import PlacementConfig
from router_service.engine import LINK_CHECK_S, SwitchCluster

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1], [88, 1], [40, 41, 1],
           [12, 13, 14, 15, 1]]
MAX_NEW = 40
PACKING = PlacementConfig(experts_per_actor=2, restart_timeout_s=60)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    path, hf_model = checkpoint_factory("reliability", num_experts=8, expert_capacity=64, num_decoder_layers=6,
                                        num_sparse_decoder_layers=3)
    return path, [tokens for tokens, _ in hf_generate(hf_model, PROMPTS, MAX_NEW)]


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def live_groups(prefix: str) -> list[str]:
    return [g["name"] for g in placement_group_table().values()
            if g["name"].startswith(prefix) and g["state"] != "REMOVED"]


def wait_until_stalled(actor) -> None:
    """Until `actor` (which takes one call at a time) holds a call past 2 s: the stall injected (a decoding step's
    calls take milliseconds)."""
    wait_until(lambda: not ray.wait([actor.info.remote()], timeout=2.0)[0], "the actor to stall in a call")


def test_actor_that_crashes_mid_call_restarts_and_every_request_completes_unchanged(ray_cluster, checkpoint):
    """Fails if the actors lose `max_restarts`/`max_task_retries` (experts/fleet.py): the call in flight is
    lost and the batch fails instead of being retried."""
    path, reference = checkpoint
    with SwitchCluster(path, placement=PACKING, local_experts=False) as model:
        victim = model.actors[1]
        pid_before = ray.get(victim.info.remote())["pid"]
        ray.get(victim.inject_fault.remote(at_call=5))  # exits inside its 5th call: a call in flight
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        after = ray.get(victim.info.remote())
        assert after["pid"] != pid_before  # the fault fired, and Ray started the actor again
        assert sum(ray.get(victim.token_counts.remote()).values()) > 0  # the new process ran the retried calls
    assert [o.token_ids for o in outputs] == reference


def test_actor_gone_for_good_fails_its_requests_at_once(ray_cluster, checkpoint):
    """The kill lands while the actor stalls in a call (injected, 60 s): the batch fails at once rather than
    after the stall. Fails if the dispatcher waits out its timeout on a dead actor."""
    path, _ = checkpoint
    with SwitchCluster(path, placement=PACKING, local_experts=False) as model:
        victim = model.actors[0]
        ray.get(victim.inject_fault.remote(at_call=3, stall_s=60))
        thread, result = generate_in_background(model, PROMPTS, max_new_tokens=MAX_NEW)
        wait_until_stalled(victim)  # the batch is now held by the stalled call
        started = time.monotonic()
        ray.kill(victim, no_restart=True)
        thread.join(60)
        assert time.monotonic() - started < 20
    assert isinstance(result.get("error"), ray.exceptions.RayActorError)


def test_an_actor_that_does_not_answer_in_time_stops_the_front_until_it_answers(ray_cluster, checkpoint):
    """An actor holding a call past restart_timeout_s (a stall injected here; in service, a restart that outlasts
    it, or a long call) fails its batch, and the front serves nothing until that actor answers again: its experts are
    not ready, saying why (a served front answers NOT_SERVING and refuses requests at once), where each new batch
    would wait out the timeout in turn and fail. Once it answers, the same prompts give the same tokens. Fails if
    the front stays ready after the timeout, or stays down once the actor answers."""
    from router_service.dispatch import ExpertsUnavailable

    path, reference = checkpoint
    with SwitchCluster(path, placement=PACKING.model_copy(update={"restart_timeout_s": 4}),
                       local_experts=False) as model:
        ray.get(model.actors[0].inject_fault.remote(at_call=1, stall_s=10))
        with pytest.raises(ExpertsUnavailable, match=r"expert actors \[0\] did not answer .* within 4 s"):
            model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        time.sleep(LINK_CHECK_S + 0.5)  # the link's looks at the fleet, all within the stall
        assert not model.experts_ready
        assert model.link.status.startswith("expert actors [0] did not answer")
        assert model.link.status.endswith("waiting for them to answer")
        wait_until(lambda: model.experts_ready, "the late actor to answer")
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert [o.token_ids for o in outputs] == reference


def test_a_batch_failed_by_lost_actors_is_retryable_when_served():
    """What the Python API raises when actors are lost (their death, or their absence past restart_timeout_s; the
    tests above) is served as UNAVAILABLE (503), which clients retry. Fails if one is mapped to another status."""
    import grpc

    from router_service.dispatch import ExpertsUnavailable
    from router_service.server import error_status

    for error in (ray.exceptions.ActorDiedError(), ray.exceptions.RayActorError(), ExpertsUnavailable("late")):
        assert error_status(error) == (grpc.StatusCode.UNAVAILABLE, 503)


def test_an_actor_gone_for_good_is_started_again_by_its_fleet_the_others_kept(ray_cluster, checkpoint,
                                                                            monkeypatch):
    """Ray starts again an actor that dies, but not one killed for good or whose restart failed (its checkpoint
    missing on the node it was moved to, say): the batch that needed it fails (the link's pings, which would find
    it first, left out here), then its fleet starts that actor again, keeping the others, and the same prompts give
    the same tokens. Fails if the fleet goes on handing out the dead actor (every request after failing)."""
    from router_service.dispatch import ExpertDispatcher

    monkeypatch.setattr(ExpertDispatcher, "actors_dead", lambda self, timeout_s=1.0: False)
    path, reference = checkpoint
    with SwitchCluster(path, placement=PACKING, local_experts=False) as model:
        pids = [info["pid"] for info in model.actor_info()]
        ray.kill(model.actors[1], no_restart=True)
        with pytest.raises(ray.exceptions.RayActorError):
            model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)  # waits for the actor started again
        now = [info["pid"] for info in model.actor_info()]
    assert now[1] != pids[1] and now[:1] + now[2:] == pids[:1] + pids[2:]
    assert [o.token_ids for o in outputs] == reference


def test_an_idle_front_finds_any_actor_gone_for_good_and_has_it_started_again(ray_cluster, checkpoint):
    """With no request in flight, the link's look every few seconds finds an actor killed for good, whichever it is,
    and its fleet starts it again: the next batch does not fail. Meanwhile the Python API lists no actors, and asking
    them waits for the new ones, as a batch would. Fails if the look pings only the first actor (as it once did: the
    next batch to need another failed), or if the dead actor is still listed and asked (its death raised)."""
    path, reference = checkpoint
    with SwitchCluster(path, placement=PACKING, local_experts=False) as model:
        pids = [info["pid"] for info in model.actor_info()]
        ray.kill(model.actors[-1], no_restart=True)
        deadline = time.monotonic() + 60
        while model.experts_ready:  # until the link has found it
            assert time.monotonic() < deadline, "the dead actor was not found"
            time.sleep(0.1)
        assert (model.actors, model.placement) == ([], None)
        now = [info["pid"] for info in model.actor_info()]
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert now[-1] != pids[-1] and now[:-1] == pids[:-1]
    assert [o.token_ids for o in outputs] == reference


def test_an_actor_that_dies_each_time_it_loads_fails_the_load_naming_it(ray_cluster, checkpoint, monkeypatch):
    """An actor whose process dies as it loads (killed for memory as it reads its weights, say) is started again
    `ACTOR_RESTARTS` times, then the load fails naming it, and the fleet frees its actors and placement group. Fails
    if Ray starts such an actor again for ever (the load waits for good, saying only how many have loaded)."""
    path, _ = checkpoint
    starts = path.parent / f"{path.name}-starts"

    class DiesAsItLoads(ExpertActor):  # defined here, so that Ray sends it to the actors' processes whole
        def __init__(self, *args):
            with open(starts, "a") as f:
                f.write("started\n")
            os._exit(1)

    monkeypatch.setattr(fleet, "ExpertActor", DiesAsItLoads)
    loading = fleet.ExpertFleet(SwitchCheckpoint.open(path), PlacementConfig(experts_per_actor=1000), "float32",
                                name="dies-as-it-loads")
    with pytest.raises(fleet.ExpertLoadError, match=r"^expert actor 0 \(node 1 of 1 in the placement, \d+ experts\) "
                                                    r"died as it loaded and is not started again: The actor is dead "):
        loading.actors(wait_s=120)
    assert starts.read_text().count("started") == fleet.ACTOR_RESTARTS + 1
    assert live_groups("dies-as-it-loads") == []


def test_fleet_that_dies_comes_back_with_new_actors(ray_cluster, checkpoint):
    """The process owning the expert actors dies while a call is in flight (an actor stalls in it): the batch
    fails, Ray starts the fleet again, it starts and loads new actors, the engine picks them up, and the same
    prompts give the same tokens. The old actors and placement group are gone. Fails if the fleet is not
    restartable (`max_restarts` in experts.fleet.start_fleet) or the engine keeps the dead actors
    (router_service.engine.ExpertLink)."""
    path, reference = checkpoint
    with SwitchCluster(path, placement=PACKING, local_experts=False) as model:
        prefix = fleet_name(model.checkpoint, model.config.placement, model.dtype, model.config.quantize)
        group = live_groups(prefix)
        assert len(group) == 1
        old_pids = [info["pid"] for info in model.actor_info()]
        ray.get(model.actors[0].inject_fault.remote(at_call=3, stall_s=30))
        thread, result = generate_in_background(model, PROMPTS, max_new_tokens=MAX_NEW)
        wait_until_stalled(model.actors[0])
        killed = time.monotonic()
        ray.kill(model.fleet, no_restart=False)  # as if its process crashed
        thread.join(60)
        assert isinstance(result.get("error"), ray.exceptions.RayActorError)
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)  # waits for the new actors
        print(f"\nserving again {time.monotonic() - killed:.1f} s after the fleet's process was killed")
        new_pids = [info["pid"] for info in model.actor_info()]
        assert not set(new_pids) & set(old_pids)
        assert not any(process_exists(pid) for pid in old_pids)
        assert live_groups(prefix) == group  # the new group only (same name, the old removed)
    assert [o.token_ids for o in outputs] == reference
    assert live_groups(prefix) == []  # shutdown released it


def test_a_front_computing_its_nodes_experts_decodes_without_the_actors(ray_cluster, checkpoint):
    """With the front computing the experts of the actors on its node, a batch already decoding never calls them:
    it completes unchanged after their fleet died, and the front goes on computing the same experts from the
    weights it holds, not mapped and packed again. Fails if a decoding step still calls the actors, if the link keeps
    the old actors, or if it builds the experts' weights again."""
    path, reference = checkpoint
    with SwitchCluster(path, placement=PACKING) as model:
        old_actors, old_local = model.actors, model.dispatcher.local
        old_pids = [info["pid"] for info in model.actor_info()]
        decode_step, steps = model.front.decode_step, []

        def decode_step_once_the_fleet_died(*args, **kwargs):
            steps.append(None)
            if len(steps) == 3:  # the batch decoding: the fleet and its actors killed, and gone before the next step
                ray.kill(model.fleet, no_restart=False)
                deadline = time.monotonic() + 30
                while any(process_exists(pid) for pid in old_pids) and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert not any(process_exists(pid) for pid in old_pids)
            return decode_step(*args, **kwargs)

        model.front.decode_step = decode_step_once_the_fleet_died
        assert [o.token_ids for o in model.generate(PROMPTS, max_new_tokens=MAX_NEW)] == reference
        del model.front.decode_step
        assert len(steps) > 3 and model.dispatcher.calls == 0
        deadline = time.monotonic() + 90
        while model.actors in ([], old_actors) and time.monotonic() < deadline:  # the link takes the new fleet's
            time.sleep(0.5)
        assert [o.token_ids for o in model.generate(PROMPTS, max_new_tokens=MAX_NEW)] == reference
        local = model.dispatcher.local
        assert local is not old_local and set(local) == set(old_local)
        assert all(local[key] is old_local[key] for key in old_local)
        assert not {info["pid"] for info in model.actor_info()} & set(old_pids)
