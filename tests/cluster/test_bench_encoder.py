"""cluster.bench_encoder times an encoder pass of the front and of transformers on the same prompts (the times are
measurements, not checked): here, that it runs and counts the prompts' tokens, padded as transformers takes them."""

from __future__ import annotations

import torch

from cluster.bench_encoder import measure
from cluster.testing import tiny_config, write_random_checkpoint


def test_times_both_encoders_on_the_same_prompts(tmp_path):
    write_random_checkpoint(tmp_path, tiny_config())
    prompts = [[5, 9, 23, 1], [7, 1], [4, 8, 15, 16, 23, 1]]
    r = measure(tmp_path, prompts, torch.float32)
    assert (r["prompts"], r["tokens"], r["padded_tokens"]) == (3, 12, 18)
    assert min(r["front_s"], r["transformers_s"], r["front_gflops"], r["product_gflops"]) > 0
