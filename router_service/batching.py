"""Continuous batching: sequences join and leave the decoding batch between steps.

Every step decodes all active sequences as one batch, so each sparse layer sends one call per expert actor
for all requests together. New prompts are encoded together when they are admitted; a sequence that ends
(or is cancelled) leaves at once, its cache rows kept for those that join later. Capacity is per sequence and
sampling has a generator per sequence, so what a request is batched with changes neither which of its tokens an
expert drops nor its random draws. Its values may round otherwise in the last place: a product's kernel depends on
its count of rows (experts.ffn.linear), which the batch makes, so a near tie can go either way, as it can between
transformers' own batch sizes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from experts.ffn import core_threads
from experts.spec import LayerKey
from router_service.metrics import metrics_updated
from router_service.model import DecoderCache, Routing, SwitchFront
from router_service.requests import SamplingParams

log = logging.getLogger(__name__)

# A decoding step of this many sequences or fewer runs its math on one OpenMP thread where core threads pay
# (experts.ffn.core_threads): its ops are too small for OpenMP's fork and join to pay there, and its large products run
# on every core instead (experts.ffn.linear_on_cores). Larger steps, and encoder passes (whole prompts), run on every
# OpenMP thread. On 2 cores of an AMD EPYC at switch-base-8's shape in float32 (in bfloat16 the parts do not pay there,
# see experts.ffn.parts_beat_openmp; docs/BENCHMARKS.md): one request at a time, 19.1-20.3 tokens/s this way against
# 17.5-19.1 on two OpenMP threads; in batches of 2 and of 4, the steps of two or more sequences on one thread made 27-29
# and 39-42 tokens/s, on two 30-35 and 52-57.
ONE_THREAD_UP_TO = 1


@dataclass
class Route:
    """Where one sparse layer sent a sequence's positions (the prompt's in the encoder; in the decoder, the start
    token's, then each generated token's but the last), one entry per position."""

    experts: list[int] = field(default_factory=list)  # the router's top-1 expert
    probs: list[float] = field(default_factory=list)  # its router probability
    dropped: list[bool] = field(default_factory=list)  # over the expert's capacity: only the residual carried it


@dataclass(eq=False)
class Sequence:
    """One request in flight and what it has produced so far: generated tokens, or with `pooling` the encoder's
    output (an embedding request, which leaves once encoded)."""

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    token_ids: list[int] = field(default_factory=list)  # generated, without the decoder start token
    logprobs: list[float] = field(default_factory=list)  # the model's log-probability of each chosen token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when params ask
    encoder_dropped: int = 0  # the prompt's tokens over an expert's capacity, over the encoder's sparse layers
    decoder_dropped: list[int] = field(default_factory=list)  # per token made, the decoder's sparse layers it missed
    routes: dict[LayerKey, Route] = field(default_factory=dict)  # when params ask: encoder layers, then decoder
    pooling: str | None = None  # "mean" or "none": an embedding request (requests.POOLINGS)
    embedding: torch.Tensor | None = None  # float32 [d_model] (mean) or [tokens, d_model] (none), once encoded
    finish_reason: str | None = None  # "eos", "stop" or "length" once finished ("embedded" for an embedding)
    text: str | None = None  # the answer as text, where the Python API gives it (engine.SwitchCluster.generate)
    error: BaseException | None = None  # set when the batch it was in failed
    cancelled: bool = False  # set by the caller; the sequence leaves before the next step
    on_update: Callable[[], None] | None = None  # called by the Scheduler's batching thread after a change it wants
    # Set by whoever follows it: the steps before this time.monotonic() change nothing it would look at (a paced stream
    # holds its tokens until then; a unary call waits for the end), so the batching thread does not wake its event
    # loop for them. Its end always does.
    wake_at: float = 0.0
    generator: torch.Generator | None = field(default=None, repr=False)
    arrived: float = field(default_factory=time.monotonic, repr=False)
    first_token_at: float | None = field(default=None, repr=False)
    last_token_at: float | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            if self.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.params.seed)

    @property
    def dropped_tokens(self) -> int:
        """Tokens over an expert's capacity, over all sparse layers of both stacks."""
        return self.dropped_in(len(self.decoder_dropped))

    def dropped_in(self, count: int) -> int:
        """`dropped_tokens` up to the first `count` tokens made (an answer a stop string cut)."""
        return self.encoder_dropped + sum(self.decoder_dropped[:count])

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def notify(self, now: float) -> None:
        """Tell whoever follows it of a change at `now` (time.monotonic()), if it wants this one (`wake_at`)."""
        if self.on_update is not None and (self.done or now >= self.wake_at):
            self.on_update()

    def routing(self, start: int = 0, end: int | None = None, encoder: bool = True) -> list[dict]:
        """The recorded routes as the API gives them: the encoder's (with `encoder`), then the decoder's positions
        [start, end)."""
        return [{"stack": stack, "layer": layer, "experts": r.experts[cut], "probs": r.probs[cut],
                 "dropped": r.dropped[cut]}
                for (stack, layer), r in self.routes.items()
                for cut in [slice(None) if stack == "encoder" else slice(start, end)]
                if encoder or stack == "decoder"]

    def to_dict(self, logprobs: bool = True) -> dict:
        out = {"token_ids": self.token_ids, "finish_reason": self.finish_reason,
               "dropped_tokens": self.dropped_tokens}
        if logprobs:
            out["logprobs"] = self.logprobs
        if self.params.routing:
            out["routing"] = self.routing()
        return out


def next_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
    """Each sequence's next token [batch] from its row of float32 logits [batch, vocab], on their device: the greedy
    ones' in one argmax over the batch (one per row took 2 ms of a step of 32), the others sampled row by row on the
    CPU, where their generators are."""
    tokens = logits.argmax(dim=-1)
    for row, seq in enumerate(sequences):
        if seq.params.temperature != 0:
            tokens[row] = sample(logits[row].cpu(), seq.params, seq.generator)
    return tokens


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Sample the next token from float32 logits [vocab] at a temperature above 0: temperature, then top-k, then
    top-p (the order transformers applies them in)."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the tokens outside the smallest set whose probability reaches top_p; always keep the first.
        outside = cumulative - sorted_logits.softmax(-1) >= params.top_p
        outside[0] = False  # top_p 0
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


class ContinuousBatcher:
    """Owns the decoding batch. `add` may be called from any thread; `step` from one thread only.

    `threads`: the cores of its math (default: the stepping thread's OpenMP threads as a step begins), on as many
    OpenMP threads but for small decoding steps (see ONE_THREAD_UP_TO); each step ends with the stepping thread on
    that many."""

    def __init__(self, front: SwitchFront, max_sequences: int, metrics=None, threads: int | None = None):
        self.front = front
        self.threads = threads
        self.max_sequences = max_sequences
        self.metrics = metrics  # a router_service.metrics.ServingMetrics, or None
        eos = front.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        # Held while a sequence moves from one of the counts `room` reads to another (the queue, those joining, the
        # batch), so that a reader on another thread never sees it in two of them, or in none.
        self.counting = threading.Lock()
        # The requests being encoded: no longer waiting, not yet active or returned done. Those that will decode
        # take room in the batch already.
        self.admitting: list[Sequence] = []
        self.cache: DecoderCache | None = None
        self.next_tokens = torch.zeros(0, dtype=torch.long)
        self.steps = 0  # decoding steps run

    def add(self, seq: Sequence) -> None:
        with self.counting:
            self.waiting.append(seq)

    def count_waiting(self) -> None:
        """Set the queue-depth gauge now: each step sets it, and sequences queued or cancelled set it again, as a step
        may wait long (on expert actors that restart) with callers arriving and leaving meanwhile."""
        if self.metrics is not None:
            with metrics_updated():
                self.metrics.waiting(self.num_waiting)

    # A cancelled sequence counts nowhere, though it leaves only at the next step: while a step waits (on expert
    # actors that restart, say), the requests its callers gave up on must not keep new ones out.
    @property
    def free_slots(self) -> int:
        return (self.max_sequences - sum(not seq.cancelled for seq in self.active)
                - sum(seq.pooling is None and not seq.cancelled for seq in self.admitting))

    def room(self) -> tuple[int, int]:
        """(num_waiting, free_slots), read together."""
        with self.counting:
            return self.num_waiting, self.free_slots

    @property
    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    @property
    def num_waiting(self) -> int:
        # Over a copy, made at once under the GIL: callers other than `room` read without the lock.
        return sum(not seq.cancelled for seq in list(self.waiting))

    @property
    def cache_rows(self) -> int:
        cache = self.cache
        return 0 if cache is None else cache.self_valid.shape[0]

    def step(self) -> list[Sequence]:
        """Admit waiting sequences, decode one token for every active one; returns the sequences that changed."""
        with self.counting:
            # Each flag read once: callers set them from other threads.
            waiting = [(seq, seq.cancelled) for seq in self.waiting]
            changed = [seq for seq, cancelled in waiting if cancelled]
            self.waiting = deque(seq for seq, cancelled in waiting if not cancelled)
        staying = [not seq.cancelled for seq in self.active]
        cancelled = [seq for seq, stays in zip(self.active, staying) if not stays]
        cores = self.threads or torch.get_num_threads()
        # On a GPU the products are the device's: no CPU's cores to split them over.
        on_cores = self.front.device.type == "cpu" and core_threads(cores, self.front.dtype) is not None
        try:
            self._leave(staying)  # (its cache copy may raise, a GPU's error of an earlier op: then `fail` counts them)
            if self.metrics is not None:  # a sequence cancelled mid-way (by its caller, or a stop string) counts too
                with metrics_updated():
                    self._record(cancelled)
            changed += self._admit(cores)  # embedding requests return done from it, whatever the step does next
            if self.active:
                changed += self._decode(cores, on_cores)
        except Exception as e:  # the batch fails together, and the requests waiting (see `fail`)
            log.exception("a batching step failed: its batch and the requests waiting end with this error")
            changed += self.fail(frameless(e))
        finally:
            use_threads(cores)
        self.count_waiting()  # every step, whether it decoded or only encoded
        return changed

    def _decode(self, cores: int, on_cores: bool) -> list[Sequence]:
        use_threads(1 if on_cores and len(self.active) <= ONE_THREAD_UP_TO else cores)
        self.cache, logits, routing = self.front.decode_step(self.cache, self.next_tokens)
        dropped = Routing.dropped_per_row(routing, len(self.active)).tolist()
        self.steps += 1
        # On the front's device: what comes back to the host is a token and its log-probability a sequence, not the
        # logits (4 MB a step of 32 at switch-base-8's vocabulary, whose log-softmax took 1 ms of a CPU core).
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen_ids = next_tokens(logits, self.active)
        tokens, now = chosen_ids.tolist(), time.monotonic()
        chosen = logprobs.gather(1, chosen_ids[:, None]).squeeze(1).tolist()
        for row, (seq, token) in enumerate(zip(self.active, tokens)):
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.last_token_at = now
            if seq.params.top_logprobs:  # before the token: a reader that sees the token sees these
                values, ids = torch.topk(logprobs[row], seq.params.top_logprobs)
                seq.top_logprobs.append(list(zip(ids.tolist(), values.tolist())))
            if seq.params.routing:  # the same
                for layer, r in routing.items():
                    route = seq.routes.setdefault(("decoder", layer), Route())
                    route.experts.append(int(r.expert[row, 0]))
                    route.probs.append(float(r.prob[row, 0]))
                    route.dropped.append(bool(r.dropped[row, 0]))
            seq.decoder_dropped.append(dropped[row])  # the same
            seq.token_ids.append(token)
            seq.logprobs.append(chosen[row])
            if token in seq.params.stop_token_ids:  # first: a stop token asked for ends as "stop", an EOS id too
                seq.finish_reason = "stop"
            elif token in self.eos_ids:
                seq.finish_reason = "eos"
            elif len(seq.token_ids) >= seq.params.max_new_tokens:
                seq.finish_reason = "length"
        stepped = list(self.active)
        if self.metrics is not None:
            with metrics_updated():
                self.metrics.step(len(stepped))
            with metrics_updated():
                self._record([seq for seq in stepped if seq.finish_reason is not None])
        self.next_tokens = torch.tensor(tokens, dtype=torch.long)
        self._leave([not seq.done for seq in self.active])
        return stepped

    def _record(self, leaving: list[Sequence]) -> None:
        """The latencies and dropped tokens of sequences leaving the batch, finished, cancelled or failed."""
        for seq in leaving:
            n = len(seq.token_ids)
            self.metrics.sequence_done(None if n == 0 else seq.first_token_at - seq.arrived,
                                       (seq.last_token_at - seq.first_token_at) / (n - 1) if n > 1 else None,
                                       seq.dropped_tokens)

    def fail(self, error: BaseException) -> list[Sequence]:
        """End the batch's sequences, those being admitted to it and every waiting one with `error`, and start over
        with an empty batch. The waiting ones too: a batch fails for what they would wait on in turn (expert actors
        down past restart_timeout_s, most often), so each request waits one restart_timeout_s at most and gets a
        status to retry on (a served request, on another replica), not one more wait per batch ahead of it."""
        with self.counting:  # a sequence added meanwhile is either failed here or left queued
            failed = self.active + self.admitting + list(self.waiting)
            # The cache before the sequences (here and in _leave): a reader on another thread (ModelInfo) that sees
            # no active sequence then sees no cache rows either.
            self.cache, self.active, self.admitting, self.waiting = None, [], [], deque()
        for seq in failed:
            if seq.finish_reason is None:  # one that finished at the failed step keeps its answer
                seq.error = error
        self.next_tokens = torch.zeros(0, dtype=torch.long)
        if self.metrics is not None:  # the generation requests' latencies up to the failure count too (once)
            with metrics_updated():
                self._record([seq for seq in failed if seq.pooling is None and seq.finish_reason is None])
        self.count_waiting()
        return failed

    def _admit(self, cores: int) -> list[Sequence]:
        """Encode waiting requests, generation and embedding ones together, up to a batch's worth; generation ones
        join the batch while it has room. Embedding ones need no room in it, so they do not wait for it: they
        return done."""
        joining, room, skipped = [], self.max_sequences - len(self.active), []
        with self.counting:
            while self.waiting and len(joining) < self.max_sequences:
                seq = self.waiting.popleft()
                if seq.pooling is None and room == 0:
                    skipped.append(seq)
                    continue
                room -= seq.pooling is None
                joining.append(seq)
            self.waiting.extendleft(reversed(skipped))
            self.admitting = joining  # until they join the batch or return: fail() ends them too
        if not joining:
            return []
        done = self._join(joining, cores)
        self.admitting = []
        return done

    def _join(self, joining: list[Sequence], cores: int) -> list[Sequence]:
        """Encode `joining`; the generation requests join the batch, the embedding ones are returned done."""
        use_threads(cores)
        groups = self.front.encode([seq.prompt for seq in joining])
        decoding = [[b for b, row in enumerate(rows) if joining[row].pooling is None] for rows, _ in groups]
        caches = [self.front.start_decoding(encoded.rows(keep))
                  for (_, encoded), keep in zip(groups, decoding) if keep]
        merged = (DecoderCache.merge(([] if self.cache is None else [self.cache]) + caches, self.max_sequences)
                  if caches else None)
        ordered, embedded = [], []  # the generation requests in the order of their rows in the cache
        for rows, encoded in groups:
            for b, (row, dropped) in enumerate(zip(rows, encoded.dropped.tolist())):
                seq, n = joining[row], len(joining[row].prompt)
                seq.encoder_dropped += dropped
                if seq.params.routing:
                    for layer, r in encoded.routing.items():
                        seq.routes[("encoder", layer)] = Route(r.expert[b, :n].tolist(), r.prob[b, :n].tolist(),
                                                               r.dropped[b, :n].tolist())
                if seq.pooling is None:
                    ordered.append(seq)
                    continue
                hidden = encoded.hidden[b, :n].float().cpu()
                seq.embedding = hidden.mean(dim=0) if seq.pooling == "mean" else hidden
                seq.finish_reason = "embedded"
                embedded.append(seq)
        if self.metrics is not None and embedded:
            with metrics_updated():
                self.metrics.embedded(len(embedded), sum(seq.dropped_tokens for seq in embedded))
        if not ordered:
            return embedded
        start = torch.full((len(ordered),), self.front.config.decoder_start_token_id, dtype=torch.long)
        self.cache, self.next_tokens = merged, torch.cat([self.next_tokens, start])
        with self.counting:
            self.active, self.admitting = self.active + ordered, []
        return embedded

    def _leave(self, staying: list[bool]) -> None:
        if all(staying):
            return
        if not any(staying):
            self.cache, self.next_tokens, self.active = None, self.next_tokens[:0], []
            return
        self.cache, order = self.cache.without([i for i, stay in enumerate(staying) if not stay])
        self.active = [self.active[i] for i in order]
        self.next_tokens = self.next_tokens[order]


def use_threads(n: int) -> None:
    """n OpenMP threads for this thread's math (OpenMP keeps the count per thread)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def frameless(error: BaseException) -> BaseException:
    """`error`, and the errors it was raised from, without their tracebacks: the requests it ends hold it until they
    are gone, and a failed step's frames hold the batch's cache and activations (a GPU's memory, on one)."""
    seen, chained = set(), [error]
    while chained:
        e = chained.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            e.__traceback__ = None
            chained += [e.__cause__, e.__context__]
    return error


@torch.inference_mode()
def run_to_completion(batcher: ContinuousBatcher, sequences: list[Sequence],
                      after_step: Callable[[], None] | None = None) -> list[Sequence]:
    """Decode the given sequences on this thread until every one is done, or cancelled (by another thread) and gone
    from the batch (the Python API's path); `after_step` is called after each step (to end some, say)."""
    for seq in sequences:
        batcher.add(seq)
    try:
        while batcher.has_work and not all(seq.done for seq in sequences):
            batcher.step()
            if after_step is not None:
                after_step()
        if any(seq.cancelled for seq in batcher.active):  # ended by after_step: out of the batch, its rows freed
            batcher.step()
    except BaseException as e:  # an interrupt, say: none of them stays in the batch to decode with the next call's
        batcher.fail(e)
        raise
    for seq in sequences:
        if seq.finish_reason is not None:  # `after_step` may end one at a step that failed after its token: whole
            seq.error = None
        elif seq.error is not None:
            raise seq.error
    return sequences
