"""Expert compute for switch-base-8-sized experts and a decoding step's few tokens per expert:
- on one core (an actor): a loop of one matmul pair per expert against one batched matmul over stacked weights;
- a decoding step's large products (twelve feed-forward layers, the LM head) as F.linear (MKL's x @ W.T) and as
  experts.ffn.linear (for a few rows, x @ W.T or W @ x.T, whichever it timed faster here), each on one OpenMP thread
  and on every core's, and as experts.ffn.linear_on_cores from a thread on one OpenMP thread (the way of a step of
  one sequence where core threads pay: one row split over the core threads);
- a step's expert products on every core's OpenMP threads, float32 and bfloat16: F.linear by the weights, and
  experts.ffn.linear by PackedWeights (experts.ffn.pack: their packed copies from PACKED_MIN_ROWS rows on), 96
  weights in turn;
- where there is a GPU: one sparse layer held on it, as a front on that GPU computes it, stacked (every token
  through every expert, router_service.dispatch.STACKED_MAX_ROWS) and by expert (the tokens grouped by expert on
  the host), float32, from the router's outputs on the GPU to the layer's outputs there.

    GOMP_SPINCOUNT=10000 .venv/bin/python -m cluster.bench_experts    # the replicas' spin where vCPUs share cores
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from experts.ffn import CoreThreads, grouped_ffn, linear, linear_on_cores, pack
from router_service import dispatch


def seconds(fn, repeats: int = 20) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


def one_core(experts: int, d_model: int, d_ff: int) -> None:
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


def products_on_cores(layers: int, d_model: int, d_ff: int, vocab: int) -> None:
    cores = os.cpu_count() or 1
    ffns = [(torch.randn(d_ff, d_model), torch.randn(d_model, d_ff)) for _ in range(layers)]
    lm_head = torch.randn(vocab, d_model)
    threads = CoreThreads(cores)
    print(f"\n{layers} feed-forward layers of {d_model}x{d_ff} and an LM head of {vocab}x{d_model}, float32: ms")
    print("rows   products   F.linear, 1 thread   F.linear, all cores   linear, 1 thread   linear, all cores   "
          "linear_on_cores")
    ways = ((F.linear, 1), (F.linear, cores), (linear, 1), (linear, cores),
            (lambda x, w: linear_on_cores(x, w, threads), 1))
    for rows in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(rows, d_model)
        for name, run in (("FFNs", lambda fn, x=x: [fn(F.relu(fn(x, wi)), wo) for wi, wo in ffns]),
                          ("LM head", lambda fn, x=x: fn(x, lm_head))):
            cells = []
            for fn, openmp in ways:
                torch.set_num_threads(openmp)
                with torch.inference_mode():
                    cells.append(seconds(lambda run=run, fn=fn: run(fn), repeats=5))
            print(f"{rows:4d}   {name:8s}   " + "   ".join(f"{1000 * c:{width}.2f}" for c, width in zip(
                cells, (18, 19, 16, 17, 15))))
    threads.close()


def packed_products(layers: int, experts: int, d_model: int, d_ff: int) -> None:
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    print(f"\n{layers} layers of {experts} experts' wi and wo in turn, {cores} cores: ms")
    print("rows   float32 F.linear   float32 packed   bfloat16 F.linear   bfloat16 packed")
    weights = {dtype: [w.to(dtype) for _ in range(layers * experts)
                       for w in (torch.randn(d_ff, d_model), torch.randn(d_model, d_ff))]
               for dtype in (torch.float32, torch.bfloat16)}
    packed = {dtype: [pack(w) for w in ws] for dtype, ws in weights.items()}
    for rows in (1, 2, 3, 4, 8, 32, 128, 512):
        cells = []
        for dtype in weights:
            x = {d: torch.randn(rows, d, dtype=dtype) for d in (d_model, d_ff)}
            with torch.inference_mode():
                for fn, ws in ((F.linear, weights[dtype]), (linear, packed[dtype])):
                    cells.append(seconds(lambda fn=fn, ws=ws, x=x: [fn(x[w.shape[1]], w) for w in ws], repeats=3))
        print(f"{rows:4d}   " + "   ".join(f"{1000 * c:{width}.1f}" for c, width in zip(cells, (16, 14, 17, 15))))


def stacked_layer_on_gpu(experts: int, d_model: int, d_ff: int) -> None:
    wi = torch.randn(experts, d_ff, d_model, device="cuda") * d_model ** -0.5
    wo = torch.randn(experts, d_model, d_ff, device="cuda") * d_ff ** -0.5
    layer = ("decoder", 1)
    dispatcher = dispatch.ExpertDispatcher([], {layer: {e: [0] for e in range(experts)}}, experts, act=F.relu)
    dispatcher.use([], {(*layer, e): (wi[e], wo[e]) for e in range(experts)}, {layer: (wi, wo)})
    print(f"\none sparse layer of {experts} experts of {d_model}x{d_ff} on {torch.cuda.get_device_name()}, float32: us")
    print("tokens   stacked   by expert")
    limit, dispatch.STACKED_MAX_ROWS = dispatch.STACKED_MAX_ROWS, 2 ** 30  # every count of tokens may go stacked
    try:
        for tokens in (2, 4, 8, 16, 32, 64, 128, 256):  # a lone token goes to its expert alone either way
            x = torch.randn(tokens, d_model, device="cuda")
            expert = torch.randint(0, experts, (tokens,), device="cuda")
            keep = torch.ones(tokens, dtype=torch.bool, device="cuda")  # a mask (not None) makes it go by expert

            def layer_out(keep: torch.Tensor | None, x=x, expert=expert) -> None:
                for _ in range(200):
                    dispatcher.send(*layer, x, expert, keep).result()
                torch.cuda.synchronize()

            stacked, by_expert = (seconds(lambda k=k: layer_out(k), repeats=1) / 200 for k in (None, keep))
            print(f"{tokens:6d}   {1e6 * stacked:7.0f}   {1e6 * by_expert:9.0f}")
    finally:  # gpu-check runs the benchmark in the same process next
        dispatch.STACKED_MAX_ROWS = limit


if __name__ == "__main__":
    one_core(experts=4, d_model=768, d_ff=3072)
    products_on_cores(layers=12, d_model=768, d_ff=3072, vocab=32128)
    packed_products(layers=6, experts=8, d_model=768, d_ff=3072)
    if torch.cuda.is_available():
        stacked_layer_on_gpu(experts=8, d_model=768, d_ff=3072)
