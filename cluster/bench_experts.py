"""Expert compute on one core: a loop of one matmul pair per expert (what the actors run) against one batched
matmul over the experts' stacked weights, for switch-base-8-sized experts and a few tokens per expert.

    .venv/bin/python -m cluster.bench_experts
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from experts.ffn import grouped_ffn


def seconds(fn, repeats: int = 20) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


def main(experts: int = 4, d_model: int = 768, d_ff: int = 3072) -> None:
    torch.set_num_threads(1)  # an expert actor's share of the machine
    wi, wo = torch.randn(experts, d_ff, d_model), torch.randn(experts, d_model, d_ff)
    weights = [(wi[e], wo[e]) for e in range(experts)]
    print(f"{experts} experts of {d_model}x{d_ff}, float32, 1 thread")
    print("tokens per expert   loop (ms)   batched (ms)")
    for per_expert in (2, 4, 8, 64):
        x = torch.randn(experts * per_expert, d_model)
        counts, stacked = [per_expert] * experts, x.view(experts, per_expert, d_model)
        loop = seconds(lambda x=x, counts=counts: grouped_ffn(x, counts, weights, F.relu))
        batched = seconds(lambda stacked=stacked: torch.bmm(F.relu(torch.bmm(stacked, wi.transpose(1, 2))),
                                                            wo.transpose(1, 2)))
        print(f"{per_expert:17d}   {1000 * loop:9.2f}   {1000 * batched:12.2f}")


if __name__ == "__main__":
    main()
