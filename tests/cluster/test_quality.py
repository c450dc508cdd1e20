"""`switch-serve quality`'s measurement: the front reading float32's greedy tokens back gives transformers' own
log-probabilities with float32 experts, and moves them a little with int8 experts; against float64's, float32's
rounding is small, transformers' and the front's alike."""

from __future__ import annotations

from cluster.bench import workload
from cluster.quality import logprob_drift


def test_teacher_forcing_reproduces_float32_and_int8_moves_it(checkpoint_factory):
    path, hf_model = checkpoint_factory("quality", num_experts=4, expert_capacity=64)
    report = logprob_drift(path, workload(3, hf_model.config.vocab_size, "short", seed=0))
    exact, int8 = report["none"], report["int8"]
    assert exact["tokens"] == int8["tokens"] > 0
    assert exact["max_abs_delta_logprob"] < 1e-4 and exact["greedy_token_changed"] == 0
    assert 1e-4 < int8["mean_abs_delta_logprob"] < 0.1
    # Against float64: float32's rounding alone, transformers' or the front's, is far below what int8 moves.
    assert report["float32_from_float64"]["max"] < 1e-4 and exact["from_float64"]["max"] < 1e-4
    assert int8["from_float64"]["mean"] > 1e-4
