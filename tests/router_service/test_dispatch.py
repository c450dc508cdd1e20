"""Dispatch without Ray: which actor each token goes to."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from experts.wire import call_from_wire, to_wire
from router_service import dispatch
from router_service.dispatch import ExpertDispatcher


def test_dispatcher_deals_a_replicated_experts_tokens_round_robin():
    """An expert's copies take its tokens in turn, and the turn goes on from one call to the next: a decoding step
    gives an expert a token or two, which would otherwise all go to its first copy. Fails if each call starts again
    at the first copy."""
    owners = {("encoder", 1): {0: [0], 1: [1, 2], 2: [2]}}
    dispatcher = ExpertDispatcher([], owners, num_experts=3)
    expert = torch.tensor([1, 0, 1, 1, 2, 1, 0])
    assert dispatcher.routes.owner(("encoder", 1), expert).tolist() == [1, 0, 2, 1, 2, 2, 0]
    assert [dispatcher.routes.owner(("encoder", 1), torch.tensor([1, 0])).tolist()[0] for _ in range(4)] == [1, 2, 1, 2]
    assert dispatcher.routes.owner(("encoder", 1), torch.tensor([1, 1, 1])).tolist() == [1, 2, 1]


LAYER = ("decoder", 1)


def stacked_dispatcher(experts: int = 4, d_model: int = 8, d_ff: int = 16) -> ExpertDispatcher:
    """A dispatcher that holds every expert of LAYER here, stacked."""
    torch.manual_seed(0)
    wi, wo = torch.randn(experts, d_ff, d_model), torch.randn(experts, d_model, d_ff)
    dispatcher = ExpertDispatcher([], {LAYER: {e: [0] for e in range(experts)}}, experts, act=torch.relu)
    dispatcher.use([], {(*LAYER, e): (wi[e], wo[e]) for e in range(experts)}, {LAYER: (wi, wo)})
    return dispatcher


def test_a_few_tokens_of_a_stacked_layer_are_computed_at_once_and_counted_when_settled():
    dispatcher = stacked_dispatcher()
    tokens, expert = torch.randn(5, 8), torch.tensor([3, 0, 3, 1, 3])
    stacked = dispatcher.send(*LAYER, tokens, expert, None).result()
    assert dispatcher.local_tokens == {}  # counted on the device until the step is done
    dispatcher.settle()
    assert dispatcher.local_tokens == {(*LAYER, 3): 3, (*LAYER, 0): 1, (*LAYER, 1): 1}
    by_expert = dispatcher.send(*LAYER, tokens, expert, torch.ones(5, dtype=torch.bool)).result()
    torch.testing.assert_close(stacked, by_expert)
    assert dispatcher.local_calls == 2 and dispatcher.local_tokens[(*LAYER, 3)] == 6
    # A second stacked step is counted once too: each settle adds what came since the last.
    dispatcher.send(*LAYER, tokens, expert, None).result()
    dispatcher.settle()
    dispatcher.settle()
    assert dispatcher.local_tokens == {(*LAYER, 3): 9, (*LAYER, 0): 3, (*LAYER, 1): 3}


def test_one_token_dropped_tokens_or_more_than_pay_go_expert_by_expert(monkeypatch):
    """Counted at once: not computed stacked."""
    monkeypatch.setattr(dispatch, "STACKED_MAX_ROWS", 4 * 4)  # 4 tokens of the 4 experts
    dispatcher = stacked_dispatcher()
    tokens, expert = torch.randn(5, 8), torch.tensor([3, 0, 3, 1, 3])
    dispatcher.send(*LAYER, tokens, expert, None).result()
    assert dispatcher.local_tokens == {(*LAYER, 3): 3, (*LAYER, 0): 1, (*LAYER, 1): 1}
    keep = torch.tensor([True, True, False, True])
    out = dispatcher.send(*LAYER, tokens[:4], expert[:4], keep).result()
    assert out[2].abs().sum() == 0 and out[0].abs().sum() > 0
    assert dispatcher.local_tokens[(*LAYER, 3)] == 4
    dispatcher.send(*LAYER, tokens[:1], expert[:1], None).result()
    assert dispatcher.local_tokens[(*LAYER, 3)] == 5


class RecordingActor:
    """An expert actor handle whose calls compute at once, with an expert per actor, and are recorded."""

    def __init__(self, index: int, calls: list):
        self.index, self.forward = index, self
        self.calls = calls

    def remote(self, call):
        stack, layer, experts, counts, tokens = call_from_wire(call, torch.float32, 8)
        assert (stack, layer) == LAYER
        self.calls.append((self.index, experts, counts, tuple(tokens.shape)))
        return to_wire(tokens * (1 + self.index))


def test_a_lone_token_goes_to_its_experts_first_copy_in_one_call(monkeypatch):
    monkeypatch.setattr(dispatch.ray, "get", lambda refs, timeout=None: refs)
    calls = []
    dispatcher = ExpertDispatcher([RecordingActor(i, calls) for i in range(3)], {LAYER: {0: [0], 1: [2, 1], 2: [1]}},
                                  num_experts=3)
    token = torch.randn(1, 8)
    out = dispatcher.send(*LAYER, token, torch.tensor([1]), None).result()
    assert calls == [(2, [1], [1], (1, 8))]
    torch.testing.assert_close(out, token * 3)
    assert dispatcher.calls == 1
    dropped = dispatcher.send(*LAYER, token, torch.tensor([1]), torch.tensor([False])).result()
    assert len(calls) == 1 and dropped.abs().sum() == 0
    # The next lone tokens of that expert go to its copies in turn.
    for _ in range(3):
        dispatcher.send(*LAYER, token, torch.tensor([1]), None).result()
    assert [actor for actor, *_ in calls] == [2, 1, 2, 1]


def test_for_the_benchmark_the_dispatcher_lists_the_actors_each_round_trip_called(monkeypatch):
    monkeypatch.setattr(dispatch.ray, "get", lambda refs, timeout=None: refs)
    calls = []
    dispatcher = ExpertDispatcher([RecordingActor(i, calls) for i in range(3)], {LAYER: {0: [0], 1: [2], 2: [1]}},
                                  num_experts=3)
    tokens = torch.randn(3, 8)
    dispatcher.send(*LAYER, tokens, torch.tensor([0, 2, 0]), None).result()  # not listed: trips is None
    dispatcher.trips = []
    dispatcher.send(*LAYER, tokens, torch.tensor([2, 0, 2]), None).result()
    dispatcher.send(*LAYER, tokens[:1], torch.tensor([1]), None).result()  # a lone token: one call
    assert dispatcher.trips == [[0, 1], [2]] and len(calls) == 5


def test_tokens_are_grouped_by_actor_and_expert_and_put_back_in_order(monkeypatch):
    """Expert 1 has two copies (its tokens dealt over actors 1 and 2), expert 3 is here, one token is dropped."""
    monkeypatch.setattr(dispatch.ray, "get", lambda refs, timeout=None: refs)
    calls = []
    dispatcher = ExpertDispatcher([RecordingActor(i, calls) for i in range(3)],
                                  {LAYER: {0: [0], 1: [1, 2], 2: [2], 3: [0]}}, num_experts=4, act=torch.relu)
    torch.manual_seed(0)
    wi, wo = torch.randn(16, 8), torch.randn(8, 16)
    dispatcher.use(dispatcher.actors, {(*LAYER, 3): (wi, wo)})
    tokens = torch.randn(8, 8)
    keep = torch.tensor([True, True, True, False, True, True, True, True])
    out = dispatcher.send(*LAYER, tokens, torch.tensor([1, 0, 3, 1, 2, 1, 3, 0]), keep).result()
    assert calls == [(0, [0], [2], (2, 8)), (1, [1], [1], (1, 8)), (2, [1, 2], [1, 1], (2, 8))]
    here = torch.relu(tokens @ wi.T) @ wo.T
    expected = torch.stack([tokens[0] * 2, tokens[1], here[2], torch.zeros(8), tokens[4] * 3, tokens[5] * 3, here[6],
                            tokens[7]])
    torch.testing.assert_close(out, expected)
    assert dispatcher.local_tokens == {(*LAYER, 3): 2} and (dispatcher.calls, dispatcher.local_calls) == (1, 1)


def test_a_call_that_finds_its_actor_dead_tells_the_link_and_fails(monkeypatch):
    """The link is told at once (it looks for new actors then, not at its next check), with the actors the layer
    went to (the link ignores the loss of actors it has replaced already), and the batch fails."""
    import ray

    def dead(refs, timeout=None):
        raise ray.exceptions.RayActorError()

    monkeypatch.setattr(dispatch.ray, "get", dead)
    dispatcher = ExpertDispatcher([RecordingActor(i, []) for i in range(2)], {LAYER: {0: [0], 1: [1]}},
                                  num_experts=2)
    lost = []
    dispatcher.on_lost = lambda why, actors: lost.append((why, actors))
    old = dispatcher.actors
    with pytest.raises(ray.exceptions.RayActorError):
        dispatcher.send(*LAYER, torch.randn(3, 8), torch.tensor([0, 1, 0]), None).result()
    assert len(lost) == 1 and isinstance(lost[0][0], ray.exceptions.RayActorError) and lost[0][1] is old
    # Calls to actors replaced meanwhile (their fleet started again): the layer fails, naming the old actors.
    pending = dispatcher.send(*LAYER, torch.randn(3, 8), torch.tensor([0, 1, 0]), None)
    dispatcher.use([RecordingActor(i, []) for i in range(2)], {}, owners={LAYER: {0: [0], 1: [1]}})
    with pytest.raises(ray.exceptions.RayActorError):
        pending.result()
    assert len(lost) == 2 and lost[1][1] is old and dispatcher.actors is not old


def test_calls_that_time_out_are_cancelled_and_the_late_actors_named(monkeypatch):
    """A sparse layer whose actors do not answer within the restart timeout fails, naming them to its requests and to
    the link (on_late), and cancels its calls still out: left queued on an actor that is restarting, they would be
    computed for nothing once it is back, ahead of the next requests' calls. An answer not yet copied to this node is
    an answer (fetch_local off). Fails if a late call is left queued, one that answered is cancelled, or the link is
    not told."""
    import ray

    def late(refs, timeout=None):
        raise ray.exceptions.GetTimeoutError()

    def wait(refs, num_returns, timeout, fetch_local=True):
        assert not fetch_local  # an answer still on another node is not late
        return [refs[0]], refs[1:]

    cancelled, told = [], []
    monkeypatch.setattr(dispatch.ray, "get", late)
    monkeypatch.setattr(dispatch.ray, "wait", wait)
    monkeypatch.setattr(dispatch.ray, "cancel", cancelled.append)
    actors = [RecordingActor(i, []) for i in range(3)]
    dispatcher = ExpertDispatcher(actors, {LAYER: {0: [0], 1: [1], 2: [2]}}, num_experts=3, timeout_s=20)
    dispatcher.on_late = lambda error, late, called: told.append((late, called))
    pending = dispatcher.send(*LAYER, torch.randn(3, 8), torch.tensor([0, 1, 2]), None)
    with pytest.raises(dispatch.ExpertsUnavailable, match=r"expert actors \[1, 2\] did not answer decoder layer 1 "
                                                          r"within 20 s"):
        pending.result()
    assert cancelled == pending.calls[1:]
    assert told == [([1, 2], actors)]


def test_a_layer_whose_late_calls_ray_cannot_cancel_names_every_actor_it_called(monkeypatch):
    """Ray failing at the look at which calls are late: the layer's own error is raised, naming every actor it
    called, and the link is told of them all. Fails if Ray's error replaces it (the link never told: each new batch
    would wait out the timeout again)."""
    import ray

    def late(refs, timeout=None):
        raise ray.exceptions.GetTimeoutError()

    def wait(*args, **kwargs):
        raise RuntimeError("the raylet is gone")

    told = []
    monkeypatch.setattr(dispatch.ray, "get", late)
    monkeypatch.setattr(dispatch.ray, "wait", wait)
    dispatcher = ExpertDispatcher([RecordingActor(i, []) for i in range(3)], {LAYER: {0: [0], 1: [1], 2: [2]}},
                                  num_experts=3, timeout_s=20)
    dispatcher.on_late = lambda error, late, called: told.append(late)
    with pytest.raises(dispatch.ExpertsUnavailable, match=r"expert actors \[0, 1, 2\] did not answer"):
        dispatcher.send(*LAYER, torch.randn(3, 8), torch.tensor([0, 1, 2]), None).result()
    assert told == [[0, 1, 2]]


def test_calls_abandoned_for_another_layers_late_actors_name_their_own_late_ones(monkeypatch):
    """Another micro-batch's layer of the step failed on actors past the restart timeout: this layer's calls still
    out are cancelled, and their actors told to the link as late too (they have waited about as long); abandoned for
    another failure, they are cancelled alone. Fails if the link is not told (the next batch would wait out the
    timeout on them in turn), or is told of a failure that was not lateness."""
    cancelled, told = [], []
    monkeypatch.setattr(dispatch.ray, "wait", lambda refs, num_returns, timeout, fetch_local: ([refs[0]], refs[1:]))
    monkeypatch.setattr(dispatch.ray, "cancel", cancelled.append)
    actors = [RecordingActor(i, []) for i in range(3)]
    dispatcher = ExpertDispatcher(actors, {LAYER: {0: [0], 1: [1], 2: [2]}}, num_experts=3, timeout_s=20)
    dispatcher.on_late = lambda error, late, called: told.append((late, called))
    late = dispatch.CallsUnanswered("expert actors [4] did not answer decoder layer 3 within 20 s")
    pending = dispatcher.send(*LAYER, torch.randn(3, 8), torch.tensor([0, 1, 2]), None)
    pending.abandon(late)
    assert cancelled == pending.calls[1:] and told == [([1, 2], actors)]
    pending = dispatcher.send(*LAYER, torch.randn(3, 8), torch.tensor([0, 1, 2]), None)
    pending.abandon(MemoryError("out of memory"))
    assert cancelled[2:] == pending.calls[1:] and len(told) == 1


def test_calls_that_all_answer_between_the_timeout_and_the_look_are_the_layers_result(monkeypatch):
    """The restart timeout passes, and by the look at which calls are late every one has answered: the layer has its
    outputs, no actor is named late. Fails if the layer fails (its requests a 503 for nothing, the front not ready
    until its actors answer a ping)."""
    import ray

    answers = iter([ray.exceptions.GetTimeoutError(), None])

    def get(refs, timeout=None):
        if (error := next(answers)) is not None:
            raise error
        return [to_wire(torch.full((1, 8), float(i))) for i in range(3)]

    told = []
    monkeypatch.setattr(dispatch.ray, "get", get)
    monkeypatch.setattr(dispatch.ray, "wait", lambda refs, num_returns, timeout, fetch_local: (refs, []))
    monkeypatch.setattr(dispatch.ray, "cancel", lambda call: pytest.fail("an answered call cancelled"))
    dispatcher = ExpertDispatcher([RecordingActor(i, []) for i in range(3)], {LAYER: {0: [0], 1: [1], 2: [2]}},
                                  num_experts=3, timeout_s=20)
    dispatcher.on_late = lambda *args: told.append(args)
    out = dispatcher.send(*LAYER, torch.randn(3, 8), torch.tensor([2, 0, 1]), None).result()
    assert out[:, 0].tolist() == [2.0, 0.0, 1.0] and not told


@pytest.mark.parametrize("failing", ["here", "the second call"])
def test_a_layer_that_fails_as_it_is_sent_cancels_the_calls_it_sent(monkeypatch, failing):
    """Its expert computed here fails (out of memory, say), or its second call cannot be sent: the first call is
    out, and no one will wait for it. Fails if it is left queued (see the test above)."""
    cancelled = []
    monkeypatch.setattr(dispatch.ray, "wait", lambda refs, num_returns, timeout, fetch_local: ([], refs))
    monkeypatch.setattr(dispatch.ray, "cancel", cancelled.append)
    def fails(*args):
        raise MemoryError("out of memory")

    actors = [RecordingActor(i, []) for i in range(2)]
    dispatcher = ExpertDispatcher(actors, {LAYER: {0: [0], 1: [1], 2: [0]}}, num_experts=3)
    if failing == "here":  # expert 2 here: both actors have their calls
        dispatcher.use(actors, {(*LAYER, 2): (torch.randn(16, 8), torch.randn(8, 16))},
                       owners={LAYER: {0: [0], 1: [1], 2: [0]}})
        monkeypatch.setattr(dispatch, "grouped_ffn", fails)
    else:  # actor 0's call is out
        actors[1].forward = SimpleNamespace(remote=fails)
    with pytest.raises(MemoryError):
        dispatcher.send(*LAYER, torch.randn(3, 8), torch.tensor([0, 1, 2]), None)
    assert len(cancelled) == (2 if failing == "here" else 1)


def test_a_layer_sent_while_new_actors_are_taken_up_goes_to_the_old_ones_whole(monkeypatch):
    """The link takes up new actors (their fleet started again) on its own thread, while a step may be sending a
    layer: that layer routes by the old tables alone. Fails if a layer reads some tables before `use` and some after
    (the calls sent by the old placement to the new actors, of which there are fewer here)."""
    monkeypatch.setattr(dispatch.ray, "get", lambda refs, timeout=None: refs)
    old_calls, new_calls = [], []
    dispatcher = ExpertDispatcher([RecordingActor(i, old_calls) for i in range(3)], {LAYER: {0: [0], 1: [1], 2: [2]}},
                                  num_experts=3)
    encode = dispatch.call_to_wire

    def taken_up_meanwhile(*args):
        if not new_calls and dispatcher.actors[0].calls is old_calls:
            dispatcher.use([RecordingActor(0, new_calls)], {}, owners={LAYER: {0: [0], 1: [0], 2: [0]}})
        return encode(*args)

    monkeypatch.setattr(dispatch, "call_to_wire", taken_up_meanwhile)
    tokens = torch.randn(3, 8)
    out = dispatcher.send(*LAYER, tokens, torch.tensor([2, 0, 1]), None).result()
    assert [actor for actor, *_ in old_calls] == [0, 1, 2] and new_calls == []
    torch.testing.assert_close(out, tokens * torch.tensor([[3.0], [1.0], [2.0]]))
    dispatcher.send(*LAYER, tokens, torch.tensor([2, 0, 1]), None).result()  # the next layer: the new actor
    assert len(new_calls) == 1 and len(old_calls) == 3
