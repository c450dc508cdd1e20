"""The helpers the benchmark, the soak run and the tests share (cluster/testing.py)."""

from __future__ import annotations

import math

from cluster.testing import percentile, word_tokenizer


def test_percentiles_are_nearest_rank():
    """The smallest value that at least q% of them do not exceed: of 1..10, p50 is 5, p95 and p99 are 10, p10 is 1.
    Fails if the rank rounds down (p95 of ten values would be the ninth)."""
    values = list(range(10, 0, -1))
    assert [percentile(values, q) for q in (10, 50, 90, 95, 99, 100)] == [1, 5, 9, 10, 10, 10]
    assert percentile([3.0], 50) == 3.0 and math.isnan(percentile([], 50))


def test_the_word_tokenizer_ends_each_text_with_eos():
    """As T5's tokenizers do: every prompt the tests build from text ends with </s> (id 1)."""
    tokenizer = word_tokenizer(["sort", "1", "2"])
    assert tokenizer("sort 2 1")["input_ids"] == [3, 5, 4, 1]
    assert tokenizer.decode([3, 5, 4, 1], skip_special_tokens=True) == "sort 2 1"


def test_the_tests_random_checkpoints_answer_prompts_with_many_tokens(tmp_path):
    """transformers' own init makes a tiny model emit one or two tokens whatever the prompt (0 for four of these
    five, 61 for the last), and a parity test on it compares little: the tests' checkpoints answer them with more."""
    import torch

    from cluster.testing import tiny_config, write_random_checkpoint

    model = write_random_checkpoint(tmp_path, tiny_config())
    prompts = [[5, 9, 23, 1], [7, 8, 1], [71, 3, 1], [12, 40, 3, 1], [6, 4, 1]]
    with torch.no_grad():
        tokens = {t for p in prompts
                  for t in model.generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False)[0].tolist()}
    assert len(tokens - {0}) >= 4
