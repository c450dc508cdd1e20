"""Scatter a sparse layer's tokens to the expert actors that own them and gather the results back.

The tokens of an expert whose actor runs on this process's node and CPU can be computed here instead: served in the
checkpoint's dtype, that actor's weights are the checkpoint's memory-mapped pages, which this process maps too, so the
same memory serves both (in another dtype, or int8, this process holds a copy of its own). On one node this skips a
round trip to another process (a few ms on a small machine, more than a decoding step's expert compute) and computes
with the front's threads, which would otherwise wait for it. Likewise for an actor on the front's own GPU, from the
front's copy of its weights there (a GPU's memory is not shared between processes): a round trip took 3.5-4.2 ms there,
an expert's math on the GPU a small part of that."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import ray
import torch

from experts.ffn import core_threads, expert_ffn, grouped_ffn, stacked_ffn
from experts.fleet import dead_for_good
from experts.spec import ExpertKey, LayerKey
from experts.wire import call_to_wire, from_wire
from router_service.metrics import metrics_updated

log = logging.getLogger(__name__)

# The most token-expert products (a layer's tokens times its experts) computed by every expert of a layer held
# stacked (experts.ffn.stacked_ffn) rather than by each token's own expert. On an H200, a switch-base-8 layer took
# 86-207 us stacked against 311-953 by expert from 4 to 64 tokens, 504 against 693-917 at 256, the most timed
# (cluster.bench_experts, docs/BENCHMARKS.md). A lone token goes to its expert alone.
STACKED_MAX_ROWS = 256 * 8


ONE_TOKEN = np.zeros(1, dtype=np.int64)  # the index of a lone token's call: all of it
NO_TOKENS = np.zeros(0, dtype=np.int64)  # that of a layer computed here: no calls
# A call to an expert actor: (actor, experts.wire.call_to_wire's call).
Call = tuple[int, bytes | np.ndarray]


def sorted_by(index: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """`index` sorted by `keys` (one per entry; stable: their order kept within a key), and the keys present with the
    count of each, in that order."""
    present, counts = np.unique(keys, return_counts=True)
    return index[np.argsort(keys, kind="stable")], present.tolist(), counts.tolist()


class Routes(NamedTuple):
    """Where a sparse layer's tokens go, built whole by `ExpertDispatcher.use` and read once a layer: a layer sent
    while new actors are taken up (its actors lost) routes by the old tables alone, never half of each; the step's
    later layers go by the new ones (the same experts: a link takes up only a fleet that serves the same config)."""

    actors: list  # in placement order
    local: dict[ExpertKey, tuple[torch.Tensor, torch.Tensor]]  # (wi, wo) of the experts computed here
    stacks: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]  # those of the layers held here stacked
    # By layer, each expert's: number of copies; the actors holding them [experts, most copies]; the copy its next
    # token goes to (the turn goes on from call to call); whether it is computed here.
    copies: dict[LayerKey, np.ndarray]
    hosts: dict[LayerKey, np.ndarray]
    turns: dict[LayerKey, np.ndarray]
    is_local: dict[LayerKey, np.ndarray]
    # Tokens per expert of each stacked layer computed since the last `settle`, on the device (a row each), and a one
    # to add up (expanded to the tokens, a view): made once, since each tensor made is a kernel launched every step.
    tally: tuple[torch.Tensor, dict[LayerKey, int], torch.Tensor]

    def owner(self, layer: LayerKey, expert: np.ndarray) -> np.ndarray:
        """The actor each token goes to: an expert's copies take its tokens in turn, the turn going on from one call
        to the next (a decoding step's one or two tokens an expert would otherwise all go to its first copy)."""
        hosts = self.hosts[layer]
        if hosts.shape[1] == 1:  # one copy of each expert
            return hosts[expert, 0]
        copies, turn = self.copies[layer], self.turns[layer]
        order = np.argsort(expert, kind="stable")
        counts = np.bincount(expert, minlength=len(copies))
        rank = np.empty_like(expert)
        rank[order] = np.arange(len(expert)) - (counts.cumsum() - counts)[expert[order]]
        owners = hosts[expert, (turn[expert] + rank) % copies[expert]]
        turn += counts
        return owners


class ExpertsUnavailable(RuntimeError):
    """The expert actors are not up (loading, lost with their fleet, or down longer than the dispatcher waits):
    the requests fail, retryable."""


class CallsUnanswered(ExpertsUnavailable):
    """A layer's calls that did not answer within the restart timeout."""


class ExpertDispatcher:
    """One call per actor that has tokens, all in flight at once; results put back in token order.

    `owners[(stack, layer)][expert]` lists the indices in `actors` of the actors hosting that expert; an expert
    with several copies has its tokens dealt round-robin over them. Tokens of an expert whose weights this process
    was given (see `use`) are computed here with `act`, while the calls for the others are out. A few tokens of a
    layer held here stacked are computed by all its experts at once, without waiting for the device (see `settle`).
    """

    def __init__(self, actors: list, owners: dict[tuple[str, int], dict[int, list[int]]], num_experts: int,
                 metrics=None, timeout_s: float | None = None, act=None):
        self.act = act
        self.timeout_s = timeout_s
        # Told when a call finds its actor dead, with the actors its layer went to.
        self.on_lost: Callable[[BaseException, list], None] | None = None
        # Told when a layer's calls go unanswered past timeout_s: the error, the late actors' indices, and the actors
        # its layer went to.
        self.on_late: Callable[[BaseException, list[int], list], None] | None = None
        # Sparse-layer round trips made, the front's time sending and waiting in them, and sending alone.
        self.calls, self.seconds, self.sending_seconds = 0, 0.0, 0.0
        self.trips: list[list[int]] | None = None  # for the benchmark, where a list: each round trip's actors called
        self.local_calls, self.local_tokens = 0, {}  # sparse layers with tokens computed here; tokens per expert
        self.metrics = metrics  # a router_service.metrics.ServingMetrics, or None
        self.num_experts = num_experts
        self.use(actors, {}, owners=owners)

    def use(self, actors: list, local: dict[ExpertKey, tuple[torch.Tensor, torch.Tensor]],
            stacks: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]] | None = None,
            owners: dict[tuple[str, int], dict[int, list[int]]] | None = None) -> None:
        """New actors (in placement order), and the (wi, wo) weights of the experts to compute here instead (see the
        module's doc); `stacks`: those of the layers whose every expert is here, stacked (experts.ffn.stacked_ffn);
        `owners`: which actors host each expert, where the actors place them otherwise than the ones before."""
        copies, hosts, turns = ((self.routes.copies, self.routes.hosts, self.routes.turns) if owners is None
                                else ({}, {}, {}))
        if owners is not None:
            # The tables a sparse layer's tokens are grouped by, in numpy, whose operations on a few numbers each
            # take several times less than torch's: grouping 32 tokens and encoding their calls took 0.09 ms against
            # 0.15 over 2 actors, 0.17 against 0.42 over 16 (docs/BENCHMARKS.md).
            for layer, table in owners.items():
                most = max(len(table[e]) for e in range(self.num_experts))
                copies[layer] = np.array([len(table[e]) for e in range(self.num_experts)])
                hosts[layer] = np.array([table[e] + table[e][:1] * (most - len(table[e]))
                                         for e in range(self.num_experts)])
                turns[layer] = np.zeros(self.num_experts, dtype=np.int64)
        is_local = {layer: np.zeros(self.num_experts, dtype=bool) for layer in hosts}
        for stack, layer, expert in local:
            is_local[(stack, layer)][expert] = True
        stacks = stacks or {}
        device = next(iter(stacks.values()))[0].device if stacks else None
        tally = (torch.zeros(len(stacks), self.num_experts, dtype=torch.long, device=device),
                 {layer: row for row, layer in enumerate(stacks)}, torch.ones(1, dtype=torch.long, device=device))
        self.routes = Routes(actors, local, stacks, copies, hosts, turns, is_local, tally)
        self._unsettled = False  # (taken up between steps: a step cut short by the loss of the actors counts nowhere)

    @property
    def actors(self) -> list:
        return self.routes.actors

    @property
    def local(self) -> dict[ExpertKey, tuple[torch.Tensor, torch.Tensor]]:
        return self.routes.local

    @property
    def stacks(self) -> dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]:
        return self.routes.stacks

    def actors_dead(self, timeout_s: float = 1.0) -> bool:
        """Whether an actor is dead for good (every one is when their fleet died; one alone when Ray could not start
        it again), found before a batch needs it. One that is restarting, or busy beyond `timeout_s`, counts as
        alive."""
        handles = self.actors
        return bool(handles) and bool(dead_for_good(handles, timeout_s))

    def send(self, stack: str, layer: int, tokens: torch.Tensor, expert: torch.Tensor,
             keep: torch.Tensor | None) -> PendingDispatch:
        """Start the calls for one sparse layer's kept tokens (`keep` None: all of them), then compute those whose
        expert is here; the expert outputs come from `.result()`."""
        r = self.routes
        stacked = r.stacks.get((stack, layer))
        if stacked is not None and keep is None and 1 < len(tokens) <= STACKED_MAX_ROWS // self.num_experts:
            return self._stacked_here(r, (stack, layer), tokens, expert, stacked)
        if self.trips is not None and expert.is_cuda:  # the benchmark's: the kernels queued before are the front's
            torch.cuda.synchronize(expert.device)  # time, which `.cpu()` below would count as sending
        began = time.perf_counter()
        expert = expert.cpu()
        if len(expert) == 1 and (keep is None or bool(keep[0])):
            key = (stack, layer, int(expert[0]))
            return self._one_token_here(r, key, tokens) if key in r.local else self._one_token_there(r, key, tokens)
        expert = expert.numpy()
        index = np.arange(len(expert)) if keep is None else np.flatnonzero(keep.cpu().numpy())
        here = r.is_local[(stack, layer)][expert[index]]
        pending = PendingDispatch(self, r, stack, layer, tokens, index[~here])
        try:
            if len(pending.index):
                self._call(pending, expert)
            pending.sending_s = time.perf_counter() - began
            if here.any():
                computing = time.perf_counter()
                self._compute_here(pending, index[here], expert)
                pending.local_s = time.perf_counter() - computing
        except BaseException:  # its calls out would not be waited for: cancelled as late ones are (see cancel)
            pending.cancel()
            raise
        return pending

    def _call(self, pending: PendingDispatch, expert: np.ndarray) -> None:
        """One call per actor that owns some of `pending.index`'s tokens."""
        layer, expert = (pending.stack, pending.layer), expert[pending.index]
        # Group tokens by owning actor, then by expert within it (stable: token order kept inside a group).
        owners = pending.routes.owner(layer, expert)
        pending.index, keys, per_key = sorted_by(pending.index, owners * self.num_experts + expert)
        groups: dict[int, tuple[list[int], list[int]]] = {}  # actor: its experts and their tokens' counts, in order
        for key, n in zip(keys, per_key):
            actor, e = divmod(key, self.num_experts)
            experts, counts = groups.setdefault(actor, ([], []))
            experts.append(e)
            counts.append(n)
        # Every call's arguments first, then the calls back to back: an actor that has its call computes on a
        # core this process may share, and what is left to do here would then run slower.
        calls, start, tokens = [], 0, pending.tokens[torch.from_numpy(pending.index)]
        for actor, (experts, counts) in groups.items():
            n = sum(counts)
            calls.append((actor, call_to_wire(pending.stack, pending.layer, experts, counts, tokens[start:start + n])))
            start += n
        self._submit(pending, calls)

    def _submit(self, pending: PendingDispatch, calls: list[Call]) -> None:
        """Start these calls back to back, to the actors of the routes `pending` went by."""
        handles = pending.routes.actors
        if not handles:
            raise ExpertsUnavailable("the expert actors are not up")
        if self.trips is not None:
            self.trips.append(pending.called)  # filled below
        for actor, call in calls:
            pending.calls.append(handles[actor].forward.remote(call))
            pending.called.append(actor)

    def _compute_here(self, pending: PendingDispatch, index: np.ndarray, expert: np.ndarray) -> None:
        """The FFN outputs of these tokens, whose experts are all here, into `pending`."""
        pending.local_index, experts, counts = sorted_by(index, expert[index])
        keys = [(pending.stack, pending.layer, e) for e in experts]
        pending.computed = grouped_ffn(pending.tokens[torch.from_numpy(pending.local_index)], counts,
                                       [pending.routes.local[k] for k in keys], self.act)
        self.local_calls += 1
        self._count_here(keys, counts)

    def _one_token_here(self, r: Routes, key: ExpertKey, tokens: torch.Tensor) -> PendingDispatch:
        """A decoding step of one sequence whose token's expert (`key`) is here: its output, without the sorting,
        grouping and scattering of several tokens, which took most of such a sparse layer's time beyond the expert's
        math (docs/BENCHMARKS.md)."""
        pending = PendingDispatch(self, r, key[0], key[1], tokens, NO_TOKENS)
        computing = time.perf_counter()
        pending.computed = expert_ffn(tokens, *r.local[key], self.act, core_threads())
        pending.local_s = time.perf_counter() - computing
        self.local_calls += 1
        self._count_here([key], [1])
        return pending

    def _one_token_there(self, r: Routes, key: ExpertKey, tokens: torch.Tensor) -> PendingDispatch:
        """A decoding step of one sequence whose token's expert (`key`) is in an actor: one call, to the copy whose
        turn it is (as `owner` deals them), without the sorting and grouping of several tokens, which took 0.4 ms of
        such a round trip here (docs/BENCHMARKS.md)."""
        began = time.perf_counter()
        stack, layer, expert = key
        pending = PendingDispatch(self, r, stack, layer, tokens, ONE_TOKEN)
        turn = r.turns[(stack, layer)]
        actor = int(r.hosts[(stack, layer)][expert, turn[expert] % r.copies[(stack, layer)][expert]])
        turn[expert] += 1
        self._submit(pending, [(actor, call_to_wire(stack, layer, [expert], [1], tokens))])
        pending.sending_s = time.perf_counter() - began
        return pending

    def _stacked_here(self, r: Routes, layer: LayerKey, tokens: torch.Tensor, expert: torch.Tensor,
                      stacked: tuple[torch.Tensor, torch.Tensor]) -> PendingDispatch:
        """Every token of a layer held here stacked, through all its experts at once (experts.ffn.stacked_ffn); its
        tokens per expert counted on the device until `settle`."""
        pending = PendingDispatch(self, r, *layer, tokens, NO_TOKENS)
        computing = time.perf_counter()
        pending.computed = stacked_ffn(tokens, expert, *stacked, self.act)
        pending.local_s = time.perf_counter() - computing
        self.local_calls += 1
        counts, rows, one = r.tally
        counts[rows[layer]].index_add_(0, expert, one.expand(len(expert)))
        self._unsettled = True
        return pending

    def settle(self) -> None:
        """Count the tokens computed stacked since the last call: done once a step's results have come back from
        the device, since reading the counts waits for it."""
        if not self._unsettled:
            return
        counts, rows, _ = self.routes.tally
        per_layer = counts.tolist()  # one read back
        counts.zero_()
        self._unsettled = False
        for layer, row in rows.items():
            self._count_here([(*layer, e) for e in range(self.num_experts)], per_layer[row])

    def _count_here(self, keys: list[ExpertKey], counts: list[int]) -> None:
        for key, n in zip(keys, counts):
            if not n:
                continue
            self.local_tokens[key] = self.local_tokens.get(key, 0) + n
            if self.metrics is not None:
                with metrics_updated():
                    self.metrics.computed_here(*key, n)


class PendingDispatch:
    """One sparse layer's calls in flight."""

    def __init__(self, dispatcher: ExpertDispatcher, routes: Routes, stack: str, layer: int, tokens: torch.Tensor,
                 index: np.ndarray):
        self.dispatcher, self.stack, self.layer = dispatcher, stack, layer
        self.routes = routes  # those its calls went by
        self.tokens, self.index = tokens, index  # the tokens the calls carry, in their order
        self.calls, self.called = [], []  # object refs, and the actor index of each
        # The tokens computed here, and their outputs; all the tokens, in order, where local_index is None.
        self.local_index, self.computed = None, None
        self.sending_s, self.local_s = 0.0, 0.0

    def cancel(self) -> list[int]:
        """Cancel the calls that have not answered, and return their actors' indices: left queued for an actor that is
        restarting, they would run once it is back, ahead of the calls that still matter. (Ray runs a call already
        sent to a live actor all the same.) An answer not yet copied to this node counts as one (fetch_local off):
        its actor is not late. Where Ray fails to say or to cancel, every actor called is named."""
        try:
            ready, _ = ray.wait(self.calls, num_returns=len(self.calls), timeout=0,
                                fetch_local=False) if self.calls else ([], [])
            late = [(actor, call) for actor, call in zip(self.called, self.calls) if call not in ready]
            for _, call in late:
                ray.cancel(call)
        except Exception:  # the error that ended the layer is the one to raise
            log.exception("cancelling a layer's calls failed")
            return sorted(set(self.called))
        return [actor for actor, _ in late]

    def abandon(self, error: BaseException) -> None:
        """Cancel the calls, another micro-batch of the step having failed with `error`. Where that was its actors
        answering late, the calls of this one still out have waited about as long: their actors are told to the link
        as late too (else the next batch would wait out the restart timeout on them in turn)."""
        late = self.cancel()
        if late and isinstance(error, CallsUnanswered):
            self._tell_late(error, late)

    def _tell_late(self, error: CallsUnanswered, late: list[int]) -> None:
        self._tell_link(self.dispatcher.on_late, "late", error, late, self.routes.actors)

    def _tell_link(self, tell, what: str, *args) -> None:
        """`tell(*args)`, the link's on_late or on_lost where set; its failure logged, not raised: the batch's
        requests still get the error that says what happened."""
        if tell is not None:
            try:
                tell(*args)
            except Exception:
                log.exception("telling the expert link of %s actors failed", what)

    def _answers(self, timeout_s: float | None = None) -> list:
        """The calls' answers; an actor gone for good, or with the fleet that owned it, told to the link."""
        try:
            return ray.get(self.calls, timeout=timeout_s)
        except ray.exceptions.RayActorError as e:
            self._tell_link(self.dispatcher.on_lost, "lost", e, self.routes.actors)
            raise

    def result(self) -> torch.Tensor:
        """Expert outputs [tokens, d_model] in token order, zero where not kept. Waits for every call."""
        d = self.dispatcher
        waited, results = 0.0, []
        if self.calls:
            began = time.perf_counter()
            try:
                results = self._answers(d.timeout_s)
            except ray.exceptions.GetTimeoutError:
                late = self.cancel()
                if late:
                    error = CallsUnanswered(
                        f"expert actors {late} did not answer {self.stack} layer {self.layer} within {d.timeout_s:g} "
                        "s (restarting, no room to restart them, or busy for longer than restart_timeout_s)")
                    self._tell_late(error, late)
                    raise error from None
                results = self._answers()  # every call answered between the timeout and the look
            # What the front spent sending and then waiting: with micro-batches, the rest of the round trip
            # overlaps the front's work on another micro-batch.
            waited = time.perf_counter() - began
            d.calls, d.seconds = d.calls + 1, d.seconds + self.sending_s + waited
            d.sending_seconds += self.sending_s
            results = [from_wire(r, self.tokens.dtype, self.tokens.shape[-1]) for r in results]
        if self.index is ONE_TOKEN:  # one call carried every token
            out = results[0].to(self.tokens.device)
        elif self.computed is not None and self.local_index is None:  # every token computed here, in order
            out = self.computed
        else:
            out = torch.zeros_like(self.tokens)
            if self.computed is not None:
                out[torch.from_numpy(self.local_index)] = self.computed
            if results:
                out[torch.from_numpy(self.index)] = torch.cat(results).to(out.device)
        if d.metrics is not None and (self.calls or self.computed is not None):
            with metrics_updated():
                d.metrics.dispatched(self.stack, self.layer, self.sending_s + self.local_s + waited)
        return out
