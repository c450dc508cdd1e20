"""Continuous batching without Ray: a sequence that joins a running batch (left-padded into its cache) gets
the same log-probabilities as when it runs alone, and so do the sequences it joins."""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import subprocess
import sys
import threading
import weakref
from collections import defaultdict

import pytest
import torch
from reference import LocalExperts, hf_generate

from experts import ffn
from experts.checkpoint import SwitchCheckpoint
from router_service import batching, model
from router_service.batching import (
    ONE_THREAD_UP_TO,
    ContinuousBatcher,
    Sequence,
    next_tokens,
    run_to_completion,
    sample,
)
from router_service.model import SwitchFront
from router_service.requests import SamplingParams


@pytest.fixture
def core_threads_pay(monkeypatch):
    """Whether core threads pay (experts.ffn.parts_beat_openmp), set by the test whatever this machine measures."""
    def pay(they_do: bool) -> None:
        ffn.core_threads(1)
        monkeypatch.setattr(ffn, "_parts_timings", defaultdict(ffn._parts_timings.default_factory))
        monkeypatch.setattr(ffn, "openmp_and_parts_seconds", lambda threads, dtype: [1.0, 1.0])
        monkeypatch.setattr(ffn, "parts_beat_openmp", lambda timings: they_do)

    yield pay
    ffn.core_threads(1)


def local_front(path, micro_batches: int = 1) -> SwitchFront:
    checkpoint = SwitchCheckpoint.open(path)
    return SwitchFront(checkpoint, LocalExperts(checkpoint), micro_batches=micro_batches)


def failing_at_the_second_step(front: SwitchFront, error: BaseException) -> list[int]:
    """Make `front`'s second decoding step raise `error`; returns the list each step appends its batch size to."""
    decode_step, steps = front.decode_step, []

    def failing(cache, tokens):
        steps.append(len(tokens))
        if len(steps) == 2:
            raise error
        return decode_step(cache, tokens)

    front.decode_step = failing
    return steps


def transformers_mean_embedding(checkpoint_factory, prompt: list[int]) -> torch.Tensor:
    """transformers' encoder output for `prompt` alone, averaged over its tokens (one_decoding's checkpoint)."""
    _, hf_model = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    with torch.inference_mode():
        return hf_model.encoder(input_ids=torch.tensor([prompt])).last_hidden_state[0].mean(dim=0)


def one_decoding(checkpoint_factory, max_sequences: int) -> tuple[SwitchFront, ContinuousBatcher, Sequence]:
    """A batcher on a front computing its experts here, holding one sequence decoding after its first step."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    front = local_front(path)
    batcher = ContinuousBatcher(front, max_sequences=max_sequences)
    decoding = Sequence([5, 9, 23, 1], SamplingParams(max_new_tokens=6))
    batcher.add(decoding)
    batcher.step()
    return front, batcher, decoding


def run(front, sequences: list[Sequence], join_after: dict[int, int]) -> None:
    """Step the batcher; sequence i joins after join_after.get(i, 0) steps."""
    batcher = ContinuousBatcher(front, max_sequences=8)
    step = 0
    while not all(s.done for s in sequences):
        for i, seq in enumerate(sequences):
            if join_after.get(i, 0) == step:
                batcher.add(seq)
        batcher.step()
        step += 1


@torch.inference_mode()
def test_late_joiners_match_running_alone(checkpoint_factory):
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    front = local_front(path)
    prompts = [[5, 9, 23, 4, 17, 60, 33, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1]]
    params = SamplingParams(max_new_tokens=8)
    alone = []
    for prompt in prompts:
        seq = Sequence(prompt, params)
        run(front, [seq], {})
        alone.append(seq)
    together = [Sequence(p, params) for p in prompts]
    run(front, together, {0: 0, 1: 3, 2: 5})  # 1 and 2 join a batch that has been decoding for a while
    for a, t in zip(alone, together):
        assert t.token_ids == a.token_ids and t.dropped_tokens == a.dropped_tokens
        assert t.logprobs == pytest.approx(a.logprobs, abs=1e-5)
    # Split into micro-batches (of different sizes as sequences join), the batch decodes the same.
    split = [Sequence(p, params) for p in prompts]
    run(local_front(path, micro_batches=2), split, {0: 0, 1: 3, 2: 5})
    for a, t in zip(alone, split):
        assert t.token_ids == a.token_ids and t.dropped_tokens == a.dropped_tokens
        assert t.logprobs == pytest.approx(a.logprobs, abs=1e-5)


def test_the_cache_is_as_wide_as_its_longest_sequence(checkpoint_factory):
    """When the sequences that began first leave, the cache keeps only the columns of those that stay: its width
    follows the longest sequence in it, not how long the batch has been decoding (which would grow without end
    while requests keep arriving), and its cross-attention the longest prompt in it."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    batcher = ContinuousBatcher(local_front(path), max_sequences=8)
    first = Sequence([5, 9, 23, 4, 17, 60, 33, 1], SamplingParams(max_new_tokens=6))
    later = Sequence([71, 3, 1], SamplingParams(max_new_tokens=10))
    with torch.inference_mode():
        batcher.add(first)
        for _ in range(3):
            batcher.step()
        batcher.add(later)
        while not first.done:
            batcher.step()
        assert batcher.active == [later] and len(later.token_ids) == 3
        cache = batcher.cache
        assert cache.width == len(later.token_ids)  # one column per token fed: the start token and all but the last
        assert cache.self_valid.all() and cache.cross_bias.shape[-1] == len(later.prompt)
        assert all(t.shape[0] == 1 for t in cache.self_k + cache.cross_k)
        while batcher.has_work:
            batcher.step()
    alone = Sequence(later.prompt, later.params)
    run_to_completion(ContinuousBatcher(local_front(path), max_sequences=8), [alone])
    assert later.token_ids == alone.token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_keys_cut_to_a_shorter_prompt_are_copied_once_where_attention_would_copy_them(dtype):
    """When the longest prompt leaves, the cross-attention keys are cut to the longest left: a strided view, which
    attention copies before its product at every step in bfloat16 on a CPU. There they are copied once, contiguous,
    with the rows' room for sequences that join; in float32 they stay a view. The values are those of the rows
    that stay, either way."""
    torch.manual_seed(0)
    heads, d_kv, lengths = 2, 4, [6, 3, 2]
    bias = torch.full((3, 1, 1, 6), torch.finfo(dtype).min, dtype=dtype)
    for row, n in enumerate(lengths):
        bias[row, ..., :n] = 0
    keys = [torch.randn(3, heads, 6, d_kv).to(dtype) for _ in range(2)]
    selfs = [torch.randn(3, heads, 4, d_kv).to(dtype) for _ in range(2)]
    cache = model.DecoderCache(selfs, [t.clone() for t in selfs], torch.ones(3, 2, dtype=torch.bool), keys,
                               [t.clone() for t in keys], bias, row_room=8)
    cut, order = cache.without([0])
    assert order == [2, 1] and cut.cross_bias.shape[-1] == 3
    for before, after in zip(keys, cut.cross_k, strict=True):
        assert torch.equal(after, before[[2, 1], :, :3])
        assert after.is_contiguous() == (dtype != torch.float32)
    # A sequence with a prompt no longer joins into the room, the keys' memory kept.
    first = [t[:1].clone() for t in selfs]
    prompt = [t[:1, :, :3].clone() for t in keys]
    joining = model.DecoderCache(first, first, torch.ones(1, 2, dtype=torch.bool), prompt, prompt,
                                 bias[1:2, ..., :3].clone())
    joined = model.DecoderCache.merge([cut, joining])
    assert joined.batch == 3 and [t.data_ptr() for t in joined.cross_k] == [t.data_ptr() for t in cut.cross_k]
    assert all(torch.equal(t[2], j[0]) for t, j in zip(joined.cross_k, joining.cross_k))


def test_sampling_cuts():
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0])
    assert next_tokens(torch.stack([logits, logits.flip(0)]), [Sequence([1]), Sequence([1])]).tolist() == [1, 2]
    # In one batch, a greedy row always takes its most likely token and a sampled row either of its two most likely.
    nucleus = [SamplingParams(temperature=1.0, top_p=0.8, seed=s) for s in range(50)]
    assert {tuple(next_tokens(torch.stack([logits, logits]), [Sequence([1]), Sequence([1], params)]).tolist())
            for params in nucleus} == {(1, 1), (1, 2)}
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert {sample(logits, top1, torch.Generator().manual_seed(s)) for s in range(20)} == {1}
    nucleus = SamplingParams(temperature=1.0, top_p=0.8)  # token 1 has ~0.64, with token 2 ~0.87: keep both
    assert {sample(logits, nucleus, torch.Generator().manual_seed(s)) for s in range(200)} == {1, 2}
    nucleus = SamplingParams(temperature=1.0, top_p=0.0)  # the most likely alone
    assert {sample(logits, nucleus, torch.Generator().manual_seed(s)) for s in range(200)} == {1}
    # The temperature divides the logits: cold, token 2's chance (e^-10) is nil; hot, every token comes.
    cold, hot = SamplingParams(temperature=0.1), SamplingParams(temperature=100.0)
    assert {sample(logits, cold, torch.Generator().manual_seed(s)) for s in range(200)} == {1}
    assert {sample(logits, hot, torch.Generator().manual_seed(s)) for s in range(200)} == {0, 1, 2, 3}


def test_top_p_cuts_after_the_temperature_as_transformers_does():
    """At temperature 0.5, token 1 has 0.84 of the mass, so top_p 0.8 keeps it alone, as transformers' warpers in
    their order (temperature, then top-p) do; cut before the temperature (0.64 at 1.0), token 2 would stay too. Fails
    if the cut comes first."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([0.0, 3.0, 2.0, 1.0])
    warped = TopPLogitsWarper(0.8)(None, TemperatureLogitsWarper(0.5)(None, logits[None]))[0]
    params = SamplingParams(temperature=0.5, top_p=0.8)
    sampled = {sample(logits, params, torch.Generator().manual_seed(s)) for s in range(300)}
    assert sampled == set(torch.isfinite(warped).nonzero().flatten().tolist()) == {1}


@pytest.mark.parametrize("pay", [True, False])
def test_small_decoding_steps_run_on_one_thread_and_encoder_passes_on_all(checkpoint_factory, core_threads_pay, pay):
    """Where core threads pay: fails if the batcher sets its threads once for every step, or runs the encoder pass
    of a few prompts on one thread (a build that did was 12% slower at 32 requests at once: prompts trickle in a few
    at a time). Where they do not, every step runs on every thread."""
    core_threads_pay(pay)
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    front = local_front(path)
    seen = []
    encode, decode_step = front.encode, front.decode_step

    def recording_encode(prompts):
        seen.append(("encode", len(prompts), torch.get_num_threads()))
        return encode(prompts)

    def recording_decode_step(cache, tokens):
        seen.append(("decode", len(tokens), torch.get_num_threads()))
        return decode_step(cache, tokens)

    front.encode, front.decode_step = recording_encode, recording_decode_step
    batcher = ContinuousBatcher(front, max_sequences=16, threads=3)
    many = ONE_THREAD_UP_TO + 1
    first = [Sequence([5, 9, 1], SamplingParams(max_new_tokens=2 if i < 2 else 4)) for i in range(many)]
    late = Sequence([7, 1], SamplingParams(max_new_tokens=2))

    def steps() -> None:  # on a thread of its own, as the scheduler's: the count is per thread
        with torch.inference_mode():
            for seq in first:
                batcher.add(seq)
            for step in range(4):
                if step == 2:
                    batcher.add(late)
                batcher.step()

    thread = threading.Thread(target=steps)
    thread.start()
    thread.join()
    assert seen == [("encode", many, 3), ("decode", many, 3), ("decode", many, 3),  # two end after their 2nd token
                    ("encode", 1, 3), ("decode", many - 1, 1 if pay else 3), ("decode", many - 1, 1 if pay else 3)]


def test_products_on_every_core_decode_the_same(checkpoint_factory, core_threads_pay, monkeypatch):
    """Small decoding steps on two cores compute their products on both (experts.ffn.linear_on_cores, forced here for
    the tiny model's small weights): a step of one sequence splits them over the core threads, a step of two runs
    them on two OpenMP threads. The same tokens and log-probabilities as on one core."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    prompts, lengths = [[5, 9, 23, 4, 17, 60, 33, 1], [71, 3, 1]], [8, 3]  # 3 steps of two, then 5 of one
    outputs, products = {}, []
    linear = ffn.linear

    def noting_linear(x, weight):  # rows, OpenMP threads, whether on a core thread, the weight's rows
        products.append((x.numel() // x.shape[-1], torch.get_num_threads(),
                         threading.current_thread().name.startswith("switch-serve-cores"), weight.shape[0]))
        return linear(x, weight)

    monkeypatch.setattr(ffn, "linear", noting_linear)
    core_threads_pay(True)
    for cores in (1, 2):
        monkeypatch.setattr(ffn, "SPLIT_MIN_BYTES", 0 if cores > 1 else 1 << 60)
        batcher = ContinuousBatcher(local_front(path), max_sequences=8, threads=cores)
        sequences = [Sequence(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)]
        thread = threading.Thread(target=run_to_completion, args=(batcher, sequences))
        thread.start()
        thread.join()
        outputs[cores] = sequences
    vocab = SwitchCheckpoint.open(path).config.vocab_size  # the LM head, which only decoding steps use
    assert (1, 1, True, vocab - vocab // 2) in products  # its second part, split off
    assert (2, 2, False, vocab) in products  # two rows on two OpenMP threads
    for one, two in zip(outputs[1], outputs[2]):
        assert two.token_ids == one.token_ids and two.done
        assert two.logprobs == pytest.approx(one.logprobs, abs=1e-5)


def test_whether_core_threads_pay_is_timed_for_the_fronts_dtype(checkpoint_factory, monkeypatch):
    """On an AMD EPYC, bfloat16 products of one row cut into a part per core took twice as long as on two OpenMP
    threads, where float32's took 0.7 times as long: the batcher asks about its front's dtype."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    checkpoint, asked = SwitchCheckpoint.open(path), []
    ffn.core_threads(1)
    monkeypatch.setattr(ffn, "_parts_timings", defaultdict(ffn._parts_timings.default_factory))
    monkeypatch.setattr(ffn, "openmp_and_parts_seconds", lambda threads, dtype: (asked.append(dtype), [1.0, 1.0])[1])
    try:
        front = SwitchFront(checkpoint, LocalExperts(checkpoint, dtype=torch.bfloat16), dtype=torch.bfloat16)
        batcher = ContinuousBatcher(front, max_sequences=4, threads=2)
        seq = Sequence([5, 9, 1], SamplingParams(max_new_tokens=2))
        thread = threading.Thread(target=run_to_completion, args=(batcher, [seq]))
        thread.start()
        thread.join()
    finally:
        ffn.core_threads(1)
    assert asked == [torch.bfloat16] and seq.done and seq.error is None and len(seq.token_ids) == 2


def test_sequences_that_join_write_into_the_caches_room(checkpoint_factory):
    """A sequence that joins a decoding batch writes its rows into the room the cache's memory holds, instead of the
    whole cache being copied; one whose prompt is longer than any in the batch gets a copy with room for it. Each
    decodes as it does alone, and so do those it joins. Fails if a join copies the cache while it has room."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    front = local_front(path)
    prompts = [[5, 9, 23, 4, 17, 60, 33, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1], list(range(20, 32))]
    params = SamplingParams(max_new_tokens=8)
    alone = [run_to_completion(ContinuousBatcher(front, max_sequences=8), [Sequence(p, params)])[0] for p in prompts]
    batcher = ContinuousBatcher(front, max_sequences=8)
    together = [Sequence(p, params) for p in prompts]

    def memory(cache) -> list[int]:
        return [t.data_ptr() for t in cache.self_k + cache.self_v + cache.cross_k + cache.cross_v]

    with torch.inference_mode():
        batcher.add(together[0])
        batcher.step()
        batcher.add(together[1])  # the first join: the cache had no room, so a copy with room for 8
        batcher.step()
        assert batcher.cache.row_room == 8 and batcher.cache.batch == 2
        before = memory(batcher.cache)
        batcher.add(together[2])  # its prompt no longer than the first's: into the room
        batcher.step()
        assert batcher.cache.batch == 3 and memory(batcher.cache) == before
        batcher.add(together[3])  # longer than any in the batch: copied
        batcher.step()
        assert batcher.cache.batch == 4 and memory(batcher.cache) != before
        while batcher.has_work:
            batcher.step()
    for a, t in zip(alone, together):
        assert t.token_ids == a.token_ids and t.logprobs == pytest.approx(a.logprobs, abs=1e-5)
    # A join that fills the room to its last row writes into it too.
    batcher = ContinuousBatcher(front, max_sequences=3)
    with torch.inference_mode():
        for seq in [Sequence(p, params) for p in prompts[:2]]:
            batcher.add(seq)
            batcher.step()
        assert batcher.cache.row_room == 3 and batcher.cache.batch == 2
        before = memory(batcher.cache)
        batcher.add(Sequence(prompts[2], params))
        batcher.step()
        assert batcher.cache.batch == 3 and memory(batcher.cache) == before


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_encoders_products_take_every_prompts_real_tokens_at_once(checkpoint_factory, monkeypatch,
                                                                        micro_batches):
    """Prompts of different lengths are attended in groups, each padded to its longest, but every product of the
    encoder multiplies the real tokens of all of them at once (of a micro-batch's), and no padding; each prompt's
    output is transformers' encoder's for it alone. Fails if a group reads another's tokens, position biases or
    padding, or its rows come back in another order."""
    path, hf_model = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    front = local_front(path, micro_batches)
    lengths, rows, product = [3, 9, 4, 20], [], front._linear
    prompts = [[(7 * i + 3 * j) % 50 + 5 for j in range(n)] for i, n in enumerate(lengths)]
    monkeypatch.setattr(model, "ENCODER_GROUP_COST", 0)  # a group for each length
    monkeypatch.setattr(front, "_linear", lambda x, weight: rows.append(x.shape[:-1]) or product(x, weight))
    with torch.inference_mode():  # as the batcher runs it (and transformers' model, as the other tests here do)
        encoded = front.encode(prompts)
        alone = [hf_model.encoder(input_ids=torch.tensor([p])).last_hidden_state[0] for p in prompts]
    assert sorted(r for group, _ in encoded for r in group) == list(range(len(prompts)))
    assert len(encoded) == len(lengths)
    halves = [sorted(lengths)[:2], sorted(lengths)[2:]] if micro_batches == 2 else [lengths]
    assert rows and set(rows) == {(sum(half),) for half in halves}
    for group, out in encoded:
        for b, r in enumerate(group):
            assert out.mask[b].sum() == lengths[r]
            torch.testing.assert_close(out.hidden[b, :lengths[r]], alone[r], atol=1e-4, rtol=1e-4)


class RecordingMetrics:
    """router_service.metrics.ServingMetrics' calls from the batcher, recorded."""

    def __init__(self):
        self.done, self.embedded_dropped, self.steps, self.queue = [], 0, [], []

    def step(self, batch: int) -> None:
        self.steps.append(batch)

    def waiting(self, requests: int) -> None:
        self.queue.append(requests)

    def sequence_done(self, first_token_s, per_token_s, dropped: int) -> None:
        self.done.append((first_token_s, per_token_s, dropped))

    def embedded(self, inputs: int, dropped: int) -> None:
        self.embedded_dropped += dropped


@torch.inference_mode()
def test_metrics_count_every_sequence_that_leaves(checkpoint_factory):
    """A sequence cancelled mid-way (as a stop string or a client gone cancels it) records its latencies and dropped
    tokens as a finished one does, and an embedding request its dropped tokens. Fails if only the sequences that
    finish on their own are recorded."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    metrics = RecordingMetrics()
    batcher = ContinuousBatcher(local_front(path), max_sequences=8, metrics=metrics)
    prompt = [5, 9, 23, 4, 17, 60, 33, 1]  # more tokens than 4 experts of capacity 2 take: some are dropped
    finishing, cancelled = Sequence(prompt, SamplingParams(max_new_tokens=6)), Sequence(prompt)
    embedding = Sequence(prompt, pooling="mean")
    for seq in (finishing, cancelled, embedding):
        batcher.add(seq)
    for _ in range(3):
        batcher.step()
    cancelled.cancelled = True
    while batcher.has_work:
        batcher.step()
    assert embedding.finish_reason == "embedded" and embedding.dropped_tokens > 0
    assert metrics.embedded_dropped == embedding.dropped_tokens
    assert len(cancelled.token_ids) == 3 and cancelled.finish_reason is None
    assert [d for _, _, d in metrics.done] == [cancelled.dropped_tokens, finishing.dropped_tokens]
    assert all(ttft > 0 and tpot > 0 for ttft, tpot, _ in metrics.done)
    # The time per output token is over the tokens after the first; each decoding step reports its batch, and every
    # step the queue.
    per_token = (finishing.last_token_at - finishing.first_token_at) / (len(finishing.token_ids) - 1)
    assert metrics.done[1][1] == pytest.approx(per_token)
    assert metrics.steps[0] == 2 and metrics.steps[-1] == 1 and len(metrics.steps) == 6
    assert metrics.queue == [0] * 6


@torch.inference_mode()
def test_metrics_count_the_sequences_a_failed_batch_ends(checkpoint_factory):
    """A failed step ends the batch and the queue: each sequence records what it had, a decoding one its time to
    first token, one still queued nothing but the call. Fails if a failure's sequences leave no latency behind."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    front = local_front(path)
    failing_at_the_second_step(front, RuntimeError("expert actor lost"))
    metrics = RecordingMetrics()
    batcher = ContinuousBatcher(front, max_sequences=1, metrics=metrics)
    decoding, queued = Sequence([5, 9, 23, 1]), Sequence([7, 1])
    for seq in (decoding, queued):
        batcher.add(seq)
    batcher.step()
    assert metrics.done == [] and metrics.queue == [1]
    assert set(batcher.step()) == {decoding, queued} and decoding.error is queued.error is not None
    assert len(decoding.token_ids) == 1
    assert metrics.done == [(decoding.first_token_at - decoding.arrived, None, decoding.dropped_tokens),
                            (None, None, 0)]
    assert metrics.queue[0] == 1 and metrics.queue[-1] == 0


class FailingMetrics(RecordingMetrics):
    """Metrics whose every update raises (Ray's metrics agent refusing a value, say)."""

    def __getattribute__(self, name):
        if name in ("step", "waiting", "sequence_done", "embedded"):
            raise RuntimeError(f"metric {name} failed")
        return super().__getattribute__(name)


@torch.inference_mode()
def test_metrics_that_fail_lose_no_request(checkpoint_factory, caplog, monkeypatch):
    """Every sequence is answered and told how it ended, finished, embedded or failed, though every metric update
    raises: the failures are logged, once within FAILURE_LOG_S (not at every step). Fails if a step's or a failure's
    sequences are lost to a metric's error (their callers would wait for ever)."""
    from router_service import metrics

    monkeypatch.setattr(metrics, "_failure_logged_at", -math.inf)
    monkeypatch.setattr(metrics, "_failures_unsaid", 0)
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    batcher = ContinuousBatcher(local_front(path), max_sequences=8, metrics=FailingMetrics())
    finishing, embedding = Sequence([5, 9, 23, 1], SamplingParams(max_new_tokens=3)), Sequence([7, 1], pooling="mean")
    told = set()
    for seq in (finishing, embedding):
        batcher.add(seq)
    while batcher.has_work:
        told.update(step_as_the_scheduler_does(batcher))
    assert told == {finishing, embedding}
    assert finishing.finish_reason == "length" and embedding.finish_reason == "embedded"
    assert finishing.error is None and len(finishing.token_ids) == 3
    queued = Sequence([7, 1])
    batcher.add(queued)
    assert batcher.fail(RuntimeError("expert actor lost")) == [queued] and queued.error is not None
    assert caplog.text.count("updating the serving metrics failed") == 1 and metrics._failures_unsaid > 0


def test_the_front_and_its_batcher_import_no_ray():
    """What the CUDA checks run in a GPU machine's own Python, which may have no Ray (test_cuda.py). Fails if the
    batcher's modules import Ray (as its metrics module's Ray imports once did)."""
    code = "import sys, router_service.batching, experts.held; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def step_as_the_scheduler_does(batcher: ContinuousBatcher) -> list[Sequence]:
    """router_service.scheduler.Scheduler._step: a step that raises fails the batch."""
    try:
        return batcher.step()
    except Exception as e:
        return batcher.fail(e)


@torch.inference_mode()
@pytest.mark.parametrize("leaving", ["cancelled", "finished"])
def test_a_batch_that_fails_as_sequences_leave_counts_each_once_and_keeps_finished_answers(checkpoint_factory,
                                                                                          monkeypatch, leaving):
    """Taking sequences out of the cache can raise (on a GPU, the error of an earlier op surfaces at its first read
    back): the batch fails, each of its sequences is counted once, and one that finished at that step keeps its
    answer. Fails if a cancelled sequence is counted before it has left, or a finished one gets the error."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    metrics = RecordingMetrics()
    batcher = ContinuousBatcher(local_front(path), max_sequences=8, metrics=metrics)
    ending, staying = Sequence([5, 9, 23, 1], SamplingParams(max_new_tokens=2)), Sequence([7, 1])
    for seq in (ending, staying):
        batcher.add(seq)
    step_as_the_scheduler_does(batcher)
    assert len(ending.token_ids) == 1 and metrics.done == []
    if leaving == "cancelled":
        ending.cancelled = True

    def device_error(self, leaving):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(type(batcher.cache), "without", device_error)
    step_as_the_scheduler_does(batcher)
    assert len(metrics.done) == 2 and staying.error is not None
    if leaving == "finished":
        assert ending.finish_reason == "length" and ending.error is None and len(ending.token_ids) == 2
    else:
        assert ending.error is not None and len(ending.token_ids) == 1
    assert batcher.active == [] and batcher.cache is None


@torch.inference_mode()
def test_an_answer_the_python_api_ends_at_a_failed_step_is_returned_whole(checkpoint_factory, monkeypatch):
    """A step can fail after its tokens are made (here as a finished sequence leaves the cache): an answer that its
    token completed (a stop string, found after the step as SwitchCluster.generate finds them) is whole, and is
    returned. Fails if the call raises the step's error for it."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    batcher = ContinuousBatcher(local_front(path), max_sequences=8)
    ending, stopping = Sequence([5, 9, 23, 1], SamplingParams(max_new_tokens=2)), Sequence([7, 1])

    def device_error(self, leaving):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def end_at_a_stop_string() -> None:  # its second token completes one
        if len(stopping.token_ids) == 2:
            stopping.finish_reason, stopping.cancelled = "stop", True

    monkeypatch.setattr(model.DecoderCache, "without", device_error)
    run_to_completion(batcher, [ending, stopping], end_at_a_stop_string)
    assert stopping.error is None and len(stopping.token_ids) == 2 and stopping.finish_reason == "stop"
    assert ending.finish_reason == "length" and ending.error is None


@torch.inference_mode()
def test_an_embedding_returns_though_the_decoding_step_after_it_fails(checkpoint_factory):
    """An embedding request encoded in a step whose decoding then fails (an expert actor lost, say) returns its
    embedding: it needs nothing of that step. The sequences decoding get the error. Fails if the embedding is never
    returned, which leaves its caller waiting for good."""
    front, batcher, decoding = one_decoding(checkpoint_factory, max_sequences=8)

    def lost(cache, tokens):
        raise RuntimeError("expert actor lost")

    front.decode_step = lost
    embedding = Sequence([71, 3, 1], pooling="mean")
    batcher.add(embedding)
    assert set(batcher.step()) == {decoding, embedding}
    assert isinstance(decoding.error, RuntimeError) and embedding.error is None
    assert embedding.finish_reason == "embedded"
    torch.testing.assert_close(embedding.embedding, transformers_mean_embedding(checkpoint_factory, [71, 3, 1]))
    assert not batcher.has_work


@torch.inference_mode()
def test_a_failed_step_ends_the_requests_waiting_too_and_the_next_is_served(checkpoint_factory):
    """A decoding step that fails (an expert actor down past restart_timeout_s, say) ends its batch and the requests
    waiting for room with its error at once: each would wait for the same actors in turn, one restart_timeout_s a
    batch ahead of it, where a retryable status lets its client go to another replica. A request after is served.
    Fails if the queue outlives its batch's failure."""
    front, batcher, decoding = one_decoding(checkpoint_factory, max_sequences=1)
    waiting = Sequence([7, 8, 1])
    batcher.add(waiting)
    decode_step = front.decode_step

    def lost(cache, tokens):
        raise RuntimeError("expert actor lost")

    front.decode_step = lost
    assert set(batcher.step()) == {decoding, waiting} and not batcher.has_work
    assert isinstance(decoding.error, RuntimeError) and waiting.error is decoding.error
    front.decode_step = decode_step
    later = run_to_completion(batcher, [Sequence([6, 4, 1], SamplingParams(max_new_tokens=3))])
    assert later[0].error is None and len(later[0].token_ids) == 3


@torch.inference_mode()
def test_a_python_api_call_that_fails_ends_at_its_first_failure(checkpoint_factory):
    """A call of more prompts than the batch holds fails whole at its first failed step: its prompts still waiting
    end with that error at once, not decoded (each group's encoder pass could wait restart_timeout_s for the same
    lost actors) only to be thrown away. Fails if the call decodes on after the failure."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    front = local_front(path)
    batcher = ContinuousBatcher(front, max_sequences=2)
    steps = failing_at_the_second_step(front, RuntimeError("expert actor lost"))
    sequences = [Sequence([5 + i, 9, 1], SamplingParams(max_new_tokens=20)) for i in range(6)]
    with pytest.raises(RuntimeError, match="expert actor lost"):
        run_to_completion(batcher, sequences)
    assert len(steps) == 2 and all(isinstance(seq.error, RuntimeError) for seq in sequences)
    assert not batcher.has_work


@torch.inference_mode()
def test_requests_whose_admission_fails_after_their_encoder_pass_get_the_error(checkpoint_factory, monkeypatch):
    """A failure after the encoder pass, as the prompts join the batch (here the start tokens' tensor; a GPU's error
    of an earlier op shows at such a later one), fails the requests being admitted with the rest of the batch, but for
    an embedding already made. Fails if they are left out of both the queue and the batch, where no one ever tells
    their callers."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    batcher = ContinuousBatcher(local_front(path), max_sequences=8, metrics=RecordingMetrics())
    decoding = Sequence([5, 9, 23, 1], SamplingParams(max_new_tokens=6))
    batcher.add(decoding)
    batcher.step()

    class FailingFull:  # the batcher's torch, whose `full` fails
        def __getattr__(self, name):
            return getattr(torch, name) if name != "full" else lambda *args, **kwargs: 1 / 0

    monkeypatch.setattr(batching, "torch", FailingFull())
    joining, embedding = Sequence([7, 8, 1], SamplingParams(max_new_tokens=6)), Sequence([71, 3, 1], pooling="mean")
    batcher.add(joining)
    batcher.add(embedding)
    assert set(batcher.step()) == {decoding, joining, embedding}
    assert all(isinstance(seq.error, ZeroDivisionError) for seq in (decoding, joining))
    # The embedding was made before the failure: it keeps it.
    assert embedding.error is None and embedding.finish_reason == "embedded"
    torch.testing.assert_close(embedding.embedding, transformers_mean_embedding(checkpoint_factory, [71, 3, 1]))
    assert not batcher.has_work and batcher.cache is None


@torch.inference_mode()
def test_an_interrupted_call_of_the_python_api_leaves_nothing_in_the_batch(checkpoint_factory):
    """A KeyboardInterrupt in a step (escaping the step's own `except Exception`) ends the call's sequences, so that
    the next call decodes its own alone. Fails if they stay in the batch."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    front = local_front(path)
    batcher = ContinuousBatcher(front, max_sequences=8)
    steps = failing_at_the_second_step(front, KeyboardInterrupt())
    first = [Sequence([5, 9, 23, 1], SamplingParams(max_new_tokens=6)), Sequence([7, 8, 1])]
    with pytest.raises(KeyboardInterrupt):
        run_to_completion(batcher, first)
    assert all(isinstance(seq.error, KeyboardInterrupt) for seq in first) and not batcher.has_work
    later = run_to_completion(batcher, [Sequence([6, 4, 1], SamplingParams(max_new_tokens=3))])
    assert len(later[0].token_ids) == 3 and steps[2:] == [1, 1, 1]


def stepped_batcher(checkpoint_factory, sequences: list[Sequence]) -> ContinuousBatcher:
    """A batcher of two sequences at most, given `sequences`, after its first step."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    batcher = ContinuousBatcher(local_front(path), max_sequences=2)
    for seq in sequences:
        batcher.add(seq)
    batcher.step()
    return batcher


@torch.inference_mode()
def test_the_batch_holds_at_most_its_sequences_and_a_request_cancelled_while_waiting_leaves_the_queue(
        checkpoint_factory):
    """Fails if a batch takes one sequence more than max_sequences, or if a request cancelled before it got a place
    still waits (counted against the queue's limit) and is encoded when one frees up."""
    sequences = [Sequence([5 + i, 9, 23, 1], SamplingParams(max_new_tokens=4)) for i in range(4)]
    batcher = stepped_batcher(checkpoint_factory, sequences)
    assert batcher.active == sequences[:2] and list(batcher.waiting) == sequences[2:]
    sequences[2].cancelled = True
    assert sequences[2] in batcher.step()
    assert list(batcher.waiting) == sequences[3:] and batcher.active == sequences[:2]
    while batcher.has_work:
        batcher.step()
    assert sequences[2].token_ids == [] and len(sequences[3].token_ids) == 4


@torch.inference_mode()
def test_requests_that_wait_for_room_keep_their_place_and_an_encoder_pass_takes_a_batch_at_most(checkpoint_factory):
    """Embedding requests need no room in the batch, so they pass generation requests that wait for it; those keep
    their order in the queue. One encoder pass takes at most max_sequences requests. Fails if the waiting ones go
    behind later arrivals, or if a pass takes every waiting embedding at once."""
    decoding = [Sequence([5 + i, 9, 23, 1], SamplingParams(max_new_tokens=6)) for i in range(2)]
    batcher = stepped_batcher(checkpoint_factory, decoding)
    first, embeddings, second = Sequence([7, 1]), [Sequence([8 + i, 1], pooling="mean") for i in range(3)], \
        Sequence([9, 1])
    for seq in (first, *embeddings, second):
        batcher.add(seq)
    batcher.step()
    assert [e.finish_reason for e in embeddings] == ["embedded", "embedded", None]
    assert list(batcher.waiting) == [first, embeddings[2], second]


@torch.inference_mode()
def test_top_logprobs_are_transformers_most_likely_first(checkpoint_factory):
    """At each step, each sequence of a batch records the k most likely tokens of transformers' own distribution for
    it, most likely first. Fails if fewer are kept, or one row's are another's."""
    path, hf_model = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    prompts = [[5, 9, 23, 1], [71, 3, 8, 44, 1]]
    sequences = [Sequence(p, SamplingParams(max_new_tokens=4, top_logprobs=3)) for p in prompts]
    run_to_completion(ContinuousBatcher(local_front(path), max_sequences=2), sequences)
    for seq, prompt in zip(sequences, prompts):
        [(tokens, _, steps)] = hf_generate(hf_model, [prompt], 4, distributions=True)
        assert seq.token_ids == tokens and len(seq.top_logprobs) == len(tokens)
        for top, step in zip(seq.top_logprobs, steps):
            best = torch.topk(step, 3)
            assert [t for t, _ in top] == best.indices.tolist()
            assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-4)


@torch.inference_mode()
def test_a_seeded_sequence_samples_the_same_alone_or_joining_a_sampling_batch(checkpoint_factory):
    """Its own generator: sequences sampling beside it, which it joins as they decode, change none of its draws.
    Fails if the batch draws from one generator, or a row takes another's."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    params = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=20, top_p=0.95, seed=1234)
    prompt = [14, 15, 16, 20, 27, 1]
    [alone] = run_to_completion(ContinuousBatcher(local_front(path), max_sequences=4), [Sequence(prompt, params)])
    batcher = ContinuousBatcher(local_front(path), max_sequences=4)
    others = [Sequence([5 + i, 9, 23, 1], SamplingParams(max_new_tokens=16, temperature=1.0, seed=i)) for i in range(3)]
    for seq in others:
        batcher.add(seq)
    batcher.step()
    batcher.step()
    joining = Sequence(prompt, params)
    run_to_completion(batcher, [joining])
    assert not all(seq.done for seq in others)  # some decoded beside it throughout
    assert joining.token_ids == alone.token_ids


@torch.inference_mode()
def test_a_sampled_tokens_logprob_is_transformers_before_temperature_and_cuts(checkpoint_factory):
    """Sampled hot and cut (temperature 2, top_k 3, top_p 0.9), each token's log-probability is the model's own,
    as transformers computes it over the same tokens (teacher-forced), and each token is among its 3 most likely.
    Fails if the log-probabilities are taken after the temperature or a cut."""
    # Room for every decoder token an expert: teacher-forced, transformers routes the whole sequence at once.
    path, hf_model = checkpoint_factory("roomy", num_experts=4, expert_capacity=64, num_decoder_layers=3)
    prompts = [[5, 9, 23, 1], [71, 3, 8, 44, 1]]
    sequences = [Sequence(p, SamplingParams(max_new_tokens=8, temperature=2.0, top_k=3, top_p=0.9, seed=7 + i))
                 for i, p in enumerate(prompts)]
    run_to_completion(ContinuousBatcher(local_front(path), max_sequences=2), sequences)
    start, not_greedy = hf_model.config.decoder_start_token_id, False
    for seq, prompt in zip(sequences, prompts):
        decoder = torch.tensor([[start, *seq.token_ids[:-1]]])
        logits = hf_model(input_ids=torch.tensor([prompt]), decoder_input_ids=decoder).logits[0]
        theirs = torch.log_softmax(logits.float(), dim=-1)
        assert seq.logprobs == pytest.approx([float(theirs[i, t]) for i, t in enumerate(seq.token_ids)], abs=1e-4)
        assert all(t in torch.topk(theirs[i], 3).indices.tolist() for i, t in enumerate(seq.token_ids))
        not_greedy |= any(t != int(torch.argmax(theirs[i])) for i, t in enumerate(seq.token_ids))
    assert not_greedy  # the checks above saw tokens that greedy decoding would not have chosen


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gelu_new_served_in_half_precision_follows_transformers(checkpoint_factory, dtype):
    """gelu_new rounds after each of its ops in half precision, as transformers computes it: F.gelu's tanh form,
    the same function rounded once, changed bfloat16's tokens here. Fails if the front's dense layers compute it
    otherwise."""
    import copy

    path, hf_model = checkpoint_factory("gelu-new", dense_act_fn="gelu_new", num_experts=4, expert_capacity=3)
    checkpoint = SwitchCheckpoint.open(path)
    front = SwitchFront(checkpoint, LocalExperts(checkpoint, dtype=dtype), dtype=dtype)
    prompts = [[5, 9, 23, 4, 1], [71, 3, 1], [17, 2, 40, 40, 8, 13, 1]]
    sequences = [Sequence(p, SamplingParams(max_new_tokens=12)) for p in prompts]
    run_to_completion(ContinuousBatcher(front, max_sequences=4), sequences)
    reference = hf_generate(copy.deepcopy(hf_model).to(dtype), prompts, 12)
    assert [s.token_ids for s in sequences] == [tokens for tokens, _ in reference]
    for seq, (_, logprobs) in zip(sequences, reference):
        assert seq.logprobs == pytest.approx(logprobs, abs=1e-3)


@torch.inference_mode()
@pytest.mark.parametrize("router_dtype", ["bfloat16", "float16"])
def test_routers_compute_in_the_configs_router_dtype(checkpoint_factory, router_dtype):
    """transformers' routers compute in config.router_dtype (float32 in the released checkpoints), whatever the
    model's dtype: its probabilities, rounded to it, pick the experts and scale their outputs. Fails if the routers
    compute in float32 regardless (bfloat16 routers changed the tokens here)."""
    path, hf_model = checkpoint_factory(f"router-{router_dtype}", router_dtype=router_dtype, num_experts=8,
                                        expert_capacity=3, seed=3)
    prompts = [[5, 9, 23, 4, 1], [71, 3, 1], [17, 2, 40, 40, 8, 13, 1], [33, 33, 33, 33, 2, 1]]
    sequences = [Sequence(p, SamplingParams(max_new_tokens=16)) for p in prompts]
    run_to_completion(ContinuousBatcher(local_front(path), max_sequences=4), sequences)
    reference = hf_generate(hf_model, prompts, 16)
    assert [s.token_ids for s in sequences] == [tokens for tokens, _ in reference]
    for seq, (_, logprobs) in zip(sequences, reference):
        assert seq.logprobs == pytest.approx(logprobs, abs=1e-5)



@torch.inference_mode()
def test_the_python_apis_decoding_ends_when_a_sequence_is_cancelled(checkpoint_factory):
    """A sequence cancelled by another thread leaves the batch unfinished: decoding the others goes on to their
    end, and returns. Fails if it waits for the cancelled one to finish, which it never does."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    sequences = [Sequence([5, 9, 23, 1], SamplingParams(max_new_tokens=6)), Sequence([71, 3, 1])]

    class CancellingAtTheThirdStep(ContinuousBatcher):
        def step(self):
            if self.steps == 2:
                sequences[1].cancelled = True
            return super().step()

    batcher = CancellingAtTheThirdStep(local_front(path), max_sequences=2)
    decoding = threading.Thread(target=run_to_completion, args=(batcher, sequences), daemon=True)
    decoding.start()
    decoding.join(60)
    assert not decoding.is_alive()
    assert sequences[0].finish_reason is not None and not sequences[1].done and len(sequences[1].token_ids) == 2
    assert not batcher.has_work


@torch.inference_mode()
def test_the_python_api_called_from_several_threads_takes_turns(checkpoint_factory):
    """SwitchCluster's generate and embed step the batcher on the caller's thread: calls from several threads at
    once take turns, each getting what it gets alone. Fails if two threads step one batcher together (its cache and
    sequences get out of step, and every call fails)."""
    from types import SimpleNamespace

    from router_service.engine import SwitchCluster

    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    prompts = [[5 + i, 9, 23 - i, 1] for i in range(4)]
    alone = [s.token_ids for s in run_to_completion(ContinuousBatcher(local_front(path), max_sequences=8),
                                                    [Sequence(p, SamplingParams(max_new_tokens=6)) for p in prompts])]
    model = SimpleNamespace(batcher=ContinuousBatcher(local_front(path), max_sequences=8),
                            _stepping=threading.Lock())
    results, errors = [], []

    def call(i: int) -> None:
        try:
            with torch.inference_mode():
                results.append((i, [s.token_ids for s in SwitchCluster._run(
                    model, [Sequence(prompts[i], SamplingParams(max_new_tokens=6))])][0]))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads) and not errors
    assert sorted(results) == sorted((i, alone[i]) for i in range(len(prompts)) for _ in range(3))


def test_top_p_keeps_a_token_whose_probability_reaches_it_exactly():
    """Probabilities 0.5, 0.25, 0.25 (exact in float32) and top_p 0.5: the first token's probability reaches it, so
    it is kept alone, as transformers' TopPLogitsWarper keeps it. Fails if the cut counts equality as short."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.tensor([0.5, 0.25, 0.25]).log()
    nucleus = SamplingParams(temperature=1.0, top_p=0.5)
    kept = set(torch.isfinite(TopPLogitsWarper(0.5)(None, logits[None])[0]).nonzero().flatten().tolist())
    assert {sample(logits, nucleus, torch.Generator().manual_seed(s)) for s in range(100)} == kept == {0}


@torch.inference_mode()
def test_a_stop_token_or_any_of_several_eos_ids_ends_a_sequence(checkpoint_factory):
    """A token of `stop_token_ids` ends its sequence with finish_reason "stop", and one of a config's several
    eos_token_id (a list) with "eos", the token kept as the last; one that is both, with "stop" (the request's
    field says so). Fails if either is ignored."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    prompt = [7, 8, 1]  # its tokens are not all one (the tiny random model repeats itself for many prompts)
    free = run_to_completion(ContinuousBatcher(local_front(path), max_sequences=8),
                             [Sequence(prompt, SamplingParams(max_new_tokens=8))])[0].token_ids
    # The first token after the first that the sequence had not made before, and no EOS up to it.
    at = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    token = free[at]
    assert 1 not in free[:at + 1]
    stopped = run_to_completion(ContinuousBatcher(local_front(path), max_sequences=8),
                                [Sequence(prompt, SamplingParams(max_new_tokens=8, stop_token_ids=(token,)))])[0]
    assert stopped.token_ids == free[:at + 1] and stopped.finish_reason == "stop"
    front = local_front(path)
    front.config = dataclasses.replace(front.config, eos_token_id=[1, token])
    ended = run_to_completion(ContinuousBatcher(front, max_sequences=8),
                              [Sequence(prompt, SamplingParams(max_new_tokens=8))])[0]
    assert ended.token_ids == free[:at + 1] and ended.finish_reason == "eos"
    # An EOS id asked for as a stop token ends as the request asked: "stop".
    asked = run_to_completion(ContinuousBatcher(front, max_sequences=8),
                              [Sequence(prompt, SamplingParams(max_new_tokens=8, stop_token_ids=(token,)))])[0]
    assert asked.token_ids == free[:at + 1] and asked.finish_reason == "stop"


@torch.inference_mode()
def test_a_prompt_encoded_beside_a_longer_one_gets_its_own_embedding_and_routes(checkpoint_factory):
    """Padding a short prompt to a longer one's length in the same pass changes neither its mean embedding nor its
    encoder routes, which cover its own tokens alone. Fails if the padded positions are pooled or reported."""
    path, _ = checkpoint_factory("batching", num_experts=4, expert_capacity=2, num_decoder_layers=3)
    short, long = [5, 9, 1], [7, 8, 12, 40, 3, 22, 61, 1]

    def encoded(prompts: list[list[int]]) -> list[Sequence]:
        sequences = [Sequence(p, pooling="mean") for p in prompts] + \
            [Sequence(p, SamplingParams(max_new_tokens=1, routing=True)) for p in prompts]
        return run_to_completion(ContinuousBatcher(local_front(path), max_sequences=8), sequences)

    alone, together = encoded([short]), encoded([short, long])
    assert torch.allclose(alone[0].embedding, together[0].embedding, atol=1e-5)
    routes = {(r["stack"], r["layer"]): r["experts"] for r in together[2].routing() if r["stack"] == "encoder"}
    assert routes and all(len(experts) == len(short) for experts in routes.values())
    assert routes == {(r["stack"], r["layer"]): r["experts"] for r in alone[1].routing() if r["stack"] == "encoder"}


def test_a_failed_steps_error_holds_none_of_its_frames(checkpoint_factory, monkeypatch):
    """The error a failed step ends its requests with (and the one it was raised from) holds no traceback: the
    step's locals (the batch's cache and activations: a GPU's memory, on one) go as the step ends, not when the last
    request lets go of the error or the cycle collector runs. The failure is logged with its traceback first.
    Fails if the error keeps its frames."""
    front, batcher, seq = one_decoding(checkpoint_factory, max_sequences=2)
    held, logged = [], []

    def lost(cache, tokens):
        activations = torch.zeros(1024)
        held.append(weakref.ref(activations))
        try:
            raise KeyError("actor 3")
        except KeyError as e:
            raise RuntimeError("expert actor lost") from e

    class Formatted(logging.Handler):  # keeps the text alone, not the record and its traceback
        def emit(self, record):
            logged.append(self.format(record))

    log = logging.getLogger("test_batching.failed_step")
    log.propagate = False
    log.addHandler(Formatted())
    monkeypatch.setattr(batching, "log", log)
    front.decode_step = lost
    gc.disable()
    try:
        assert batcher.step() == [seq]
        assert held[0]() is None
    finally:
        gc.enable()
    assert seq.error.__traceback__ is None and seq.error.__cause__.__traceback__ is None
    assert len(logged) == 1 and "a batching step failed" in logged[0] and "in lost" in logged[0]
