"""The expert FFN: its activations, computed with torch alone, equal transformers' ACT2FN of the same name; experts
computed at once on several threads get the work dealt evenly, and give what one thread does."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from experts.ffn import ACTIVATION_FUNCTIONS, WEIGHT_READ_TOKENS, ExpertThreads, grouped_ffn, shares
from experts.spec import ACTIVATIONS


def test_every_served_activation_has_a_function():
    assert set(ACTIVATION_FUNCTIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_equals_transformers(name, dtype):
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    ours, theirs = ACTIVATION_FUNCTIONS[name](x), ACT2FN[name](x)
    assert ours.dtype == theirs.dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours.float(), theirs.float(), atol=tolerance, rtol=tolerance), name


@pytest.fixture(scope="module")
def expert_threads():
    threads = ExpertThreads(2)
    yield threads
    threads.close()


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 2, 4, 0, 1], [1], [0, 9, 0], [200, 3, 5, 1], [40, 40, 40]])
def test_shares_cover_every_token_once_and_balance_the_threads(counts):
    n = 2
    parts = shares(counts, n)
    starts = [sum(counts[:e]) for e in range(len(counts))]
    rows = sorted(row for part in parts for expert, first, size in part
                  for row in range(first, first + size) if starts[expert] <= row < starts[expert] + counts[expert])
    assert rows == list(range(sum(counts)))  # every row once, each in its own expert's range
    share = -(-sum(counts) // n)
    assert all(size <= share for part in parts for _, _, size in part)
    loads = [sum(size + WEIGHT_READ_TOKENS for _, _, size in part) for part in parts]
    if len(parts) == n:
        assert max(loads) - min(loads) <= share + WEIGHT_READ_TOKENS
    else:  # too little work to share
        assert len(parts) == 1


def test_an_expert_with_most_of_the_tokens_is_cut_between_the_threads():
    parts = shares([200, 3, 5, 1], 2)
    assert {expert for expert, _, _ in parts[0]} & {expert for expert, _, _ in parts[1]} == {0}


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 2, 4, 0, 1], [1], [150, 2, 0, 7]])
def test_threads_compute_what_one_thread_does(expert_threads, counts):
    torch.manual_seed(0)
    weights = [(torch.randn(40, 16), torch.randn(16, 40)) for _ in counts]
    x = torch.randn(sum(counts), 16)
    seen = set()

    def act(h):
        seen.add(threading.current_thread().name)
        return F.relu(h)

    out = grouped_ffn(x, counts, weights, act, expert_threads)
    assert torch.allclose(out, grouped_ffn(x, counts, weights, F.relu), rtol=1e-5, atol=1e-6)
    if sum(1 for n in counts if n) > 1:  # the work went to the expert threads, not the caller's
        assert seen and all(name.startswith("switch-serve-experts") for name in seen)


def test_the_callers_openmp_threads_are_left_as_they_were():
    """Each expert thread computes on one OpenMP thread; the caller's count, and the count that threads started
    later begin with, stay as they were."""
    before = torch.get_num_threads()
    threads = ExpertThreads(2)
    try:
        assert torch.get_num_threads() == before
        assert threads.pool.submit(torch.get_num_threads).result() == 1
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [before]
    finally:
        threads.close()
