"""An encoder pass of a burst of prompts, the front's against transformers' on the same prompts (padded to the
longest, as `generate` pads them), beside this machine's speed at the pass's largest product in the same dtype: how
near the hardware the encoder runs. No Ray: the front computes every expert itself, as it does those on its node.

    .venv/bin/python -m cluster.bench_encoder --dtype bf16     # the benchmark's switch-base-8, 32 default prompts
    .venv/bin/python -m cluster.bench_encoder --workload long-prompts --model DIR
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import SwitchTransformersForConditionalGeneration

from cluster.bench import checkpoint, workload
from cluster.bench_step import front_with_every_expert
from cluster.workloads import BENCH_SHAPE, REQUESTS, WORKLOADS
from experts.checkpoint import read_config
from experts.spec import CONFIG_FILE, num_layers
from experts.wire import torch_dtype

RUNS = 5  # of each, alternated (the machine's speed moves between runs), after one each to warm up


def median_s(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Each run's median seconds, the runs alternated."""
    times = {name: [] for name in runs}
    for timed in [False] + [True] * RUNS:
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            if timed:
                times[name].append(time.perf_counter() - began)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def measure(folder: Path, prompts: list[list[int]], dtype: torch.dtype) -> dict:
    """Seconds of each encoder pass, and the products' speed: the pass's (its projections' and feed-forward layers'
    arithmetic over its time) and a [tokens, d_model] x [d_model, d_ff] product's alone."""
    front = front_with_every_expert(str(folder), "cpu", dtype, packed_weights=True)
    config = front.config
    model = SwitchTransformersForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([p + [config.pad_token_id or 0] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    tokens = sum(map(len, prompts))
    inner = config.num_heads * config.d_kv
    flops = 2 * tokens * num_layers(config, "encoder") * (4 * config.d_model * inner + 2 * config.d_model * config.d_ff)
    x, w = torch.randn(tokens, config.d_model, dtype=dtype), torch.randn(config.d_ff, config.d_model, dtype=dtype)
    s = median_s({"front": lambda: front.encode(prompts),
                  "transformers": lambda: model.get_encoder()(input_ids=ids, attention_mask=mask),
                  "product": lambda: torch.nn.functional.linear(x, w)})
    return {"prompts": len(prompts), "tokens": tokens, "padded_tokens": width * len(prompts), "front_s": s["front"],
            "transformers_s": s["transformers"], "front_gflops": flops / s["front"] / 1e9,
            "product_gflops": 2 * tokens * config.d_model * config.d_ff / s["product"] / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the benchmark's switch-base-8)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="default")
    parser.add_argument("--requests", type=int, default=REQUESTS)
    args = parser.parse_args()
    folder = Path(args.model) if args.model else checkpoint(BENCH_SHAPE)
    vocab = read_config(folder / CONFIG_FILE).vocab_size
    prompts = [r.prompt for r in workload(args.requests, vocab, args.workload, seed=0)]
    r = measure(folder, prompts, torch_dtype(args.dtype))
    print(f"{r['prompts']} prompts, {r['tokens']} tokens ({r['padded_tokens']} padded), {args.dtype}, "
          f"{torch.get_num_threads()} threads: the front's encoder {r['front_s']:.3f} s, transformers' "
          f"{r['transformers_s']:.3f} s ({r['transformers_s'] / r['front_s']:.2f}x); the front's products at "
          f"{r['front_gflops']:.0f} GFLOPS, a [tokens, d_model] x [d_model, d_ff] product alone at "
          f"{r['product_gflops']:.0f}")


if __name__ == "__main__":
    main()
