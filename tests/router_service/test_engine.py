"""Which experts a front computes itself: those of the actors beside it, on its node's CPU or on its own GPU, as
many as its GPU has room for; and the tokens its experts computed, counted."""

from __future__ import annotations

import re
import sys
import threading

import pytest

from router_service import engine
from router_service.engine import SwitchCluster, count_expert_tokens, experts_beside, fitting, host_memory

A, B = "gpu-uuid-a", "gpu-uuid-b"
INFOS = [
    {"node_id": "n1", "device": "cpu", "gpu_uuid": None, "experts": [["encoder", 1, 0], ["encoder", 1, 1]]},
    {"node_id": "n1", "device": "cuda", "gpu_uuid": A, "experts": [["encoder", 1, 2]]},
    {"node_id": "n1", "device": "cuda", "gpu_uuid": B, "experts": [["encoder", 1, 3]]},
    {"node_id": "n2", "device": "cpu", "gpu_uuid": None, "experts": [["decoder", 1, 0]]},
    {"node_id": "n2", "device": "cuda", "gpu_uuid": A, "experts": [["decoder", 1, 1]]},  # another node's GPU A
]


def test_a_front_on_the_cpu_computes_its_nodes_cpu_actors_experts():
    assert experts_beside(INFOS, "n1", None) == [("encoder", 1, 0), ("encoder", 1, 1)]
    assert experts_beside(INFOS, "n2", None) == [("decoder", 1, 0)]


def test_a_front_on_a_gpu_computes_only_the_experts_of_actors_on_that_gpu():
    assert experts_beside(INFOS, "n1", A) == [("encoder", 1, 2)]
    assert experts_beside(INFOS, "n1", B) == [("encoder", 1, 3)]
    assert experts_beside(INFOS, "n1", "gpu-uuid-c") == []
    assert experts_beside(INFOS, "n3", A) == []


def layer(stack: str, index: int, experts) -> list[tuple[str, int, int]]:
    return [(stack, index, e) for e in experts]


def test_a_front_short_of_gpu_room_copies_whole_layers_first_then_what_fits():
    keys = layer("encoder", 1, [0, 1]) + layer("decoder", 1, range(4)) + layer("decoder", 3, range(4))
    whole = layer("decoder", 1, range(4)) + layer("decoder", 3, range(4))
    assert fitting(keys, 99, 4) == whole + layer("encoder", 1, [0, 1])
    assert fitting(keys, 9, 4) == whole + layer("encoder", 1, [0])
    assert fitting(keys, 6, 4) == layer("decoder", 1, range(4)) + layer("decoder", 3, [0, 1])
    assert fitting(keys, 3, 4) == layer("decoder", 1, range(3))
    assert fitting(keys, 0, 4) == []


MEMINFO = "MemTotal:       24684000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"


@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("limit", [None, "none", 8 << 30, 32 << 30])
def test_the_memory_a_front_may_copy_experts_into_is_the_kernels_within_a_containers_limit(tmp_path, version, limit):
    """MemAvailable and MemTotal; under a cgroup's limit (v2's or v1's files), no more than the limit and what the
    group's use leaves of it, its inactive page cache not counted as used. Fails if the limit, the use or the page
    cache is ignored."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text(MEMINFO)
    cgroups = {name: (tmp_path / name, *files[1:]) for name, files in engine.CGROUP_MEMORY.items()}
    folder, limit_file, use_file, cache = cgroups[version]
    folder.mkdir()
    if limit is not None:
        unlimited = "max" if version == "v2" else str(2**63 - 4096)  # v1's: a number past any node's memory
        (folder / limit_file).write_text(f"{unlimited if limit == 'none' else limit}\n")
        (folder / use_file).write_text(f"{6 << 30}\n")
        (folder / "memory.stat").write_text(f"anon {3 << 30}\nfile {3 << 30}\n{cache} {2 << 30}\n")
    available, total = host_memory(tmp_path / "proc", cgroups)
    kernel = (20000000 * 1024, 24684000 * 1024)
    if limit in (None, "none"):
        assert (available, total) == kernel
    elif limit == 8 << 30:  # 8 GiB, 4 of them in use (6, less 2 of inactive page cache)
        assert (available, total) == (4 << 30, 8 << 30)
    else:  # a limit above the node's memory: the node's
        assert (available, total) == kernel
    assert host_memory(tmp_path / "nowhere", cgroups) is None


def test_expert_counts_read_while_the_batching_thread_adds_experts():
    """ModelInfo reads the front's own counts on the event loop while its batching thread adds the experts it computes
    for the first time. Fails if the read iterates the live dict ("dictionary changed size during iteration")."""
    counts, reading, reads = {}, threading.Event(), 2000

    def add() -> None:  # experts added and taken away again, until the reads are done
        while not reading.is_set():
            for layer in range(200):
                counts[("decoder", layer, 0)] = 1
            for layer in range(200):
                del counts[("decoder", layer, 0)]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes: the race shows within a few reads
    thread = threading.Thread(target=add)
    thread.start()
    try:
        for _ in range(reads):
            count_expert_tokens([counts], 1)
    finally:
        reading.set()
        thread.join()
        sys.setswitchinterval(interval)
    # And what it reads adds each actor's counts up by layer, the encoder's first.
    front, actor = {("decoder", 3, 1): 4, ("encoder", 1, 0): 2}, {("decoder", 3, 1): 5, ("decoder", 1, 0): 7}
    assert count_expert_tokens([front, actor], 2) == {("encoder", 1): [2, 0], ("decoder", 1): [7, 0],
                                                      ("decoder", 3): [0, 9]}


def test_prompts_are_token_ids_or_texts_and_an_empty_text_is_refused():
    """Fails if both kinds of prompt are taken (one silently winning), or an empty text is sent as its end token
    alone."""
    from types import SimpleNamespace

    from router_service.requests import InvalidRequest

    model = SimpleNamespace(tokenizer=lambda text: {"input_ids": [5, 1]}, config=SimpleNamespace(max_prompt_tokens=2),
                            checkpoint=SimpleNamespace(config=SimpleNamespace(vocab_size=10)))
    model.tokenizer_for = lambda field: SwitchCluster.tokenizer_for(model, field)
    for input_ids, texts, message in [([[5, 1]], ["sort : 2 1"], "texts: give input_ids or texts, not both"),
                                      (None, None, "input_ids: give input_ids or texts"),
                                      ([5, 1], None, "input_ids[0]: must be a list of token ids, got int"),
                                      (None, "sort : 2 1", "texts: a list of prompts, got str"),
                                      (None, ["sort : 2 1", 7], "texts[1]: must be a string, got int"),
                                      (None, ["sort : 2 1", ""], "texts[1]: empty prompt"),
                                      (None, ["x" * 129], "texts[0]: 129 characters, more than a prompt of at most 2 "
                                                          "tokens can have here (128)")]:
        with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}"):
            SwitchCluster._prompts(model, input_ids, texts)
    # A tokenizer's arrays (numpy's, torch's) are prompts as well as lists.
    import numpy as np
    import torch

    assert SwitchCluster._prompts(model, np.array([[5, 1]]), None) == [[5, 1]]
    assert SwitchCluster._prompts(model, torch.tensor([[5, 1], [7, 1]]), None) == [[5, 1], [7, 1]]


def test_the_python_apis_front_hands_the_placement_it_planned_to_its_fleet(ray_cluster, checkpoint_factory,
                                                                           monkeypatch):
    """The front plans the placement (a placement that does not fit fails there, saying why) and the fleet it starts
    takes that one rather than planning again (experts.fleet.ExpertFleet). Fails if the front drops it."""
    path, _ = checkpoint_factory("plain")
    handed = []

    def start_fleet(checkpoint, config, dtype, quantize, placement=None):
        handed.append((placement, engine.served_placement(checkpoint, config, dtype, quantize)))
        raise RuntimeError("no fleet for this test")

    monkeypatch.setattr(engine, "start_fleet", start_fleet)
    with pytest.raises(RuntimeError, match="no fleet for this test"):
        SwitchCluster(path, wait=False, placement={"experts_per_actor": 2})
    (given, planned), = handed
    assert given is not None and given == planned


def test_expert_actors_that_fail_to_load_fail_the_python_api_at_once_saying_why(ray_cluster, checkpoint_factory,
                                                                                tmp_path, monkeypatch):
    """The front opens the checkpoint (its headers checked) where it starts; each actor reads its experts where it
    runs. A shard that differs there (truncated, as another node's copy might be) fails the actors' load, and the
    Python API's front, whose fleet nothing starts again, raises that at once, naming the file and the tensor.
    Fails if it waits out the placement timeout, or reports Ray's wrapper instead of the cause."""
    import shutil

    from experts.checkpoint import SwitchCheckpoint
    from experts.placement import PlacementError
    from experts.spec import EXPERT_TENSOR

    source, _ = checkpoint_factory("plain-sharded", max_shard_size="20KB")
    path = shutil.copytree(source, tmp_path / "sharded")
    opened = SwitchCheckpoint.open(path)
    shard = next(info.file for name, info in opened.tensors.items() if EXPERT_TENSOR.match(name))
    assert all(EXPERT_TENSOR.match(name) for name, info in opened.tensors.items() if info.file == shard)
    real_open = SwitchCheckpoint.open

    def open_then_damage(folder):
        checkpoint = real_open(folder)
        (path / shard).write_bytes((path / shard).read_bytes()[:-100])
        return checkpoint

    monkeypatch.setattr(SwitchCheckpoint, "open", open_then_damage)
    failed = rf"^placement: the expert actors failed to load: \S*CheckpointError: \S*{shard}: tensor \S+ is cut off"
    with pytest.raises(PlacementError, match=failed):
        SwitchCluster(path, placement={"experts_per_actor": 4, "timeout_s": 600})


def test_asking_the_actors_waits_as_long_as_a_step_would_then_says_so(monkeypatch):
    """actor_info and expert_token_counts wait for actors that are not up (lost, their successors not taken up yet)
    or that do not answer (restarting where there is no room) no longer than a step waits for them, then raise
    ExpertsUnavailable. Fails if they wait for good, or ask actors that are not up."""
    from types import SimpleNamespace

    import ray

    from router_service.dispatch import ExpertsUnavailable

    waited = []

    def get(refs, timeout=None):
        waited.append(timeout)
        raise ray.exceptions.GetTimeoutError("Get timed out")

    monkeypatch.setattr(engine.ray, "get", get)
    actor = SimpleNamespace(info=SimpleNamespace(remote=lambda: "ref"))
    model = SimpleNamespace(actors=[actor], config=SimpleNamespace(placement=SimpleNamespace(restart_timeout_s=7.0)),
                            check_experts=waited.append)
    with pytest.raises(ExpertsUnavailable, match=r"did not answer within 7 s \(placement.restart_timeout_s\)"):
        SwitchCluster._ask_actors(model, "info")
    assert waited == [7.0, 7.0]  # for them to be up, then for their answers


def test_actors_too_busy_to_say_where_they_run_are_taken_up_again_not_left_to_their_round_trips(monkeypatch):
    """At take-up, actors that do not say within FLEET_POLL_S where they run (busy with other fronts' long prompts)
    fail the take-up, which the link tries again: the front is not left computing none of its node's experts until
    the next loss. Actors already lost fail it too: the front is not made ready with actors it found dead. Fails if
    a busy or lost fleet is taken up (without the experts beside the front, or with dead actors)."""
    from types import SimpleNamespace

    import ray

    from router_service.dispatch import ExpertsUnavailable

    failure = ray.exceptions.GetTimeoutError("Get timed out")

    def get(refs, timeout=None):
        raise failure

    monkeypatch.setattr(engine.ray, "get", get)
    monkeypatch.setattr(engine.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "here"))
    actor = SimpleNamespace(info=SimpleNamespace(remote=lambda: "ref"))
    model = SimpleNamespace(config=SimpleNamespace(local_experts=True))
    with pytest.raises(ExpertsUnavailable, match="did not say where they run within 5 s"):
        SwitchCluster._local_experts(model, [actor])
    failure = ray.exceptions.RayActorError()
    with pytest.raises(ExpertsUnavailable, match="the expert actors were lost as they were taken up"):
        SwitchCluster._local_experts(model, [actor])


def test_a_served_front_waits_for_its_experts_however_long_saying_what_they_wait_for(caplog):
    """A Serve front waits in its constructor with no deadline: past its fleet's failed load (Serve starts that fleet
    again), saying each new status once, until the actors are up. Fails if it gives up, or logs every look."""
    import logging
    from types import SimpleNamespace

    statuses = ["expert fleet: tensor cut off"] * 3 + ["waiting 10 s for room"] * 3 + ["ready"]
    looks = []

    def wait(timeout_s):
        looks.append(timeout_s)
        link.status = statuses[len(looks)]
        return link.status == "ready"

    link = SimpleNamespace(load_error=RuntimeError("tensor cut off"), status="asking the expert fleet", wait=wait,
                           behind_predecessor=False)
    front = SwitchCluster.__new__(SwitchCluster)  # no Ray: the wait alone
    front.link, front._owns_fleet = link, False
    # Warnings: Ray's workers show those (their stderr), not a module's info lines, with no logging set up.
    with caplog.at_level(logging.WARNING, logger=engine.__name__):
        front.wait_for_experts(None, behind_predecessor=True)
    assert len(looks) == 6 and all(0 < t <= engine.LINK_CHECK_S for t in looks)
    said = [r.getMessage() for r in caplog.records if r.name == engine.__name__]
    assert len(said) == 2 and said[0].endswith("s so far for the expert actors: expert fleet: tensor cut off")
    assert said[1].endswith(": waiting 10 s for room")


def test_a_served_front_starts_without_its_experts_where_their_fleet_waits_for_the_old_ones_room(caplog):
    """A new config's fleet waiting for room that the fleet it replaces holds for the old fronts: the front starts
    without its experts, so that Serve goes on stopping the old fronts (each draining with the old actors) and the
    old fleet frees its room. Fails if the front waits on (the old fleet would free its room only at its deadline,
    under old fronts still taking calls)."""
    import logging
    from types import SimpleNamespace

    looks = []

    def wait(timeout_s):
        looks.append(timeout_s)
        link.behind_predecessor = len(looks) >= 3
        return False

    link = SimpleNamespace(load_error=None, status="waiting 10 s for room for node 1 of 2", wait=wait,
                           behind_predecessor=False)
    front = SwitchCluster.__new__(SwitchCluster)
    front.link, front._owns_fleet = link, False
    with caplog.at_level(logging.WARNING, logger=engine.__name__):
        front.wait_for_experts(None, behind_predecessor=True)
    assert len(looks) == 3
    said = [r.getMessage() for r in caplog.records if r.name == engine.__name__]
    assert said[-1] == ("starting without the expert actors, whose fleet waits for room that the fleet it replaces "
                        "holds for the fronts still serving: waiting 10 s for room for node 1 of 2")


def test_experts_whose_own_fleet_failed_for_good_are_refused_at_once():
    """A Python API front whose fleet's load failed (a replacement actor that cannot load, say) refuses a request at
    once, naming why: nothing starts that fleet again. One whose fleet is Serve's (started again by Serve) waits
    as asked. Fails if every request waits the whole restart timeout first."""
    from types import SimpleNamespace

    from router_service.dispatch import ExpertsUnavailable

    waited = []
    front = SwitchCluster.__new__(SwitchCluster)  # no Ray: the check alone
    front.link = SimpleNamespace(load_error=RuntimeError("tensor cut off"), status="expert fleet: tensor cut off",
                                 wait=lambda wait_s: waited.append(wait_s) and False)
    for owns, asked in ((True, 0.0), (False, 60.0)):
        front._owns_fleet = owns
        with pytest.raises(ExpertsUnavailable, match="^the experts are not serving: expert fleet: tensor cut off$"):
            front.check_experts(60.0)
        assert waited.pop() == asked
