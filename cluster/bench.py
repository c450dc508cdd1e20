"""The benchmark: the served cluster against transformers' `generate`, on one checkpoint and one workload.

    switch-serve bench                      # switch-base-8's shape, random float32 weights, 32 requests
    switch-serve bench --shape tiny --json  # a quick run

Three systems, in one run, on the same requests (prompt and output lengths varied, greedy):
- cluster: the Serve app over gRPC streams, all requests in flight at once (or arriving at `--rate` per second);
- hf-single: transformers' `generate`, one request at a time, in arrival order;
- hf-batch: transformers' `generate` on static batches of `--batch-size`, padded, in arrival order.
Reported per system: output tokens per second (wall clock from the first arrival to the last token), time to
first token and time per output token (p50, p99), and the cluster's ratios to the other two.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import ray
import torch
from transformers import SwitchTransformersForConditionalGeneration

from cluster.app import FRONT_ENV, local_serve
from cluster.testing import free_port, tiny_config, write_random_checkpoint
from experts.fleet import this_node_cpus
from experts.placement import PlacementConfig, experts_per_cpu
from router_service.batching import Sequence, run_to_completion
from router_service.config import ServerConfig
from router_service.engine import SwitchCluster
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc
from router_service.requests import SamplingParams

SHAPES = {
    # switch-base-8: 12 + 12 layers, every other one sparse, 8 experts, d_model 768, d_ff 3072.
    "base-8": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_layers=12,
                   num_decoder_layers=12, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, num_experts=8,
                   expert_capacity=64),
    "tiny": dict(vocab_size=512, d_model=64, d_kv=16, d_ff=256, num_heads=4, num_layers=4, num_decoder_layers=4,
                 num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8, expert_capacity=64),
}


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    arrival: float  # seconds after the start


@dataclass
class Timing:
    arrival: float
    first_token: float | None = None
    end: float | None = None
    tokens: int = 0


@dataclass
class Result:
    system: str
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    extra: dict = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def summarize(system: str, timings: list[Timing], start: float) -> Result:
    done = [t for t in timings if t.tokens]
    tokens = sum(t.tokens for t in done)
    seconds = max(t.end for t in done) - start
    ttft = [t.first_token - (start + t.arrival) for t in done]
    tpot = [(t.end - t.first_token) / (t.tokens - 1) for t in done if t.tokens > 1]
    return Result(system, tokens, seconds, tokens / seconds, percentile(ttft, 50), percentile(ttft, 99),
                  percentile(tpot, 50), percentile(tpot, 99))


def workload(n: int, vocab: int, rate: float | None, seed: int, short: bool) -> list[Request]:
    rng = random.Random(seed)
    prompt_len, output_len = ((4, 16), (4, 16)) if short else ((8, 64), (16, 64))
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        if rate:
            t += rng.expovariate(rate)
    return [Request([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))] + [1],
                    rng.randint(*output_len), arrival) for arrival in arrivals]


def checkpoint(shape: str, folder: Path):
    """The benchmark checkpoint, written once by transformers (random weights, float32)."""
    if not (folder / "config.json").is_file():
        write_random_checkpoint(folder, tiny_config(**SHAPES[shape]), seed=0, max_shard_size="500MB")
    return SwitchTransformersForConditionalGeneration.from_pretrained(folder).eval()


class FirstTokenClock:
    """A transformers streamer that notes when each row got its first generated token."""

    def __init__(self, rows: int):
        self.calls, self.first = 0, [None] * rows

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the decoder start token, the second the first new one
            now = time.perf_counter()
            self.first = [now] * len(self.first)

    def end(self) -> None:
        pass


def hf_run(model, requests: list[Request], batch_size: int, start_wait: bool = True) -> tuple[list[Timing], float]:
    """transformers' generate over the requests in arrival order, `batch_size` at a time (right-padded)."""
    timings = [Timing(r.arrival) for r in requests]
    start = time.perf_counter()
    eos = model.config.eos_token_id
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        wait = start + batch[-1].arrival - time.perf_counter()
        if start_wait and wait > 0:
            time.sleep(wait)  # a static batch starts once its last request has arrived
        ids = torch.zeros(len(batch), max(len(r.prompt) for r in batch), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, :len(r.prompt)], mask[row, :len(r.prompt)] = torch.tensor(r.prompt), 1
        clock = FirstTokenClock(len(batch))
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, streamer=clock,
                                 max_new_tokens=max(r.max_new_tokens for r in batch))
        end = time.perf_counter()
        for row, r in enumerate(batch):
            seq = out[row, 1:].tolist()[:r.max_new_tokens]  # a request takes only the tokens it asked for
            n = seq.index(eos) + 1 if eos in seq else len(seq)
            t = timings[i + row]
            t.first_token, t.end, t.tokens = clock.first[row], end, n
    return timings, start


def cluster_run(address: str, requests: list[Request]) -> tuple[list[Timing], float]:
    """The requests as gRPC streams against the served app, each sent at its arrival time."""
    timings = [Timing(r.arrival) for r in requests]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SwitchServeStub(channel)
        start = time.perf_counter()

        def one(r: Request, t: Timing) -> None:
            wait = start + r.arrival - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            for chunk in stub.GenerateStream(pb.GenerateRequest(input_ids=r.prompt, max_new_tokens=r.max_new_tokens),
                                             timeout=3600):
                if chunk.token_ids and t.first_token is None:
                    t.first_token = time.perf_counter()
                t.tokens += len(chunk.token_ids)
            t.end = time.perf_counter()

        threads = [threading.Thread(target=one, args=pair) for pair in zip(requests, timings)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return timings, start


def decode_timed(folder: Path, requests: list[Request], experts_per_actor: int, micro_batches: int) -> dict:
    """Decode the requests through the Python API, timing the front, the sparse-layer round trips and the
    experts' compute inside them. Runs as a Ray task set up like a Serve replica (see `breakdown`)."""
    torch.set_num_threads(this_node_cpus())
    with SwitchCluster(folder, placement=PlacementConfig(experts_per_actor=experts_per_actor),
                       max_sequences=max(32, len(requests)), micro_batches=micro_batches) as model:
        warm = [Sequence(r.prompt, SamplingParams(max_new_tokens=2)) for r in requests[:2]]
        run_to_completion(model.batcher, warm)
        dispatcher = model.front.dispatch
        calls0, seconds0 = dispatcher.calls, dispatcher.seconds
        compute0 = sum(ray.get([a.compute_seconds.remote() for a in model.actors]))
        began = time.perf_counter()
        done = run_to_completion(model.batcher, [Sequence(r.prompt, SamplingParams(max_new_tokens=r.max_new_tokens))
                                                 for r in requests])
        return {"seconds": time.perf_counter() - began, "round_trip_s": dispatcher.seconds - seconds0,
                "sparse_layer_calls": dispatcher.calls - calls0,
                "expert_compute_s": sum(ray.get([a.compute_seconds.remote() for a in model.actors])) - compute0,
                "actors": len(model.actors), "decode_steps": model.batcher.steps - 1,  # less the warm-up's
                "tokens": sum(len(seq.token_ids) for seq in done), "config": model.checkpoint.config}


def breakdown(folder: Path, requests: list[Request], experts_per_actor: int, micro_batches: int) -> dict:
    """Where the cluster's time goes: the front's own compute, the sparse-layer round trips, and the experts'
    compute inside them, from the same requests decoded in a Ray worker with a replica's environment and
    threads (so without the proxy and the streams)."""
    timed = ray.remote(num_cpus=0, runtime_env={"env_vars": FRONT_ENV})(decode_timed)
    t = ray.get(timed.remote(folder, requests, experts_per_actor, micro_batches))
    total, dispatch, compute, calls = t["seconds"], t["round_trip_s"], t["expert_compute_s"], t["sparse_layer_calls"]
    work = model_work(t["config"], requests, t["tokens"])
    # The actors of one round trip run at once, so their compute overlaps: count their sum spread over them.
    transport = max(0.0, dispatch - compute / t["actors"])
    peaks = machine_peaks()
    return {"seconds": total, "front_s": total - dispatch, "round_trip_s": dispatch, "expert_compute_s": compute,
            "scatter_gather_s": transport, "sparse_layer_calls": calls, "actors": t["actors"],
            "round_trip_ms_per_call": 1000 * dispatch / calls, "scatter_gather_share": transport / total,
            "decode_steps": t["decode_steps"], **peaks,
            # The roofline: achieved FLOP/s and weight-read bandwidth against what this machine measured.
            "flops_fraction": work["flops"] / total / peaks["matmul_flops_per_s"],
            "bandwidth_fraction":
                t["decode_steps"] * work["decoder_weight_bytes"] / total / peaks["memory_bytes_per_s"]}


def machine_peaks() -> dict:
    """This machine's measured float32 matmul FLOP/s and memory bandwidth (a large copy: read + write)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    began = time.perf_counter()
    for _ in range(5):
        torch.mm(a, b)
    flops = 5 * 2 * 2048**3 / (time.perf_counter() - began)
    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    began = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    bandwidth = 5 * 2 * src.nbytes / (time.perf_counter() - began)
    return {"matmul_flops_per_s": flops, "memory_bytes_per_s": bandwidth}


def model_work(config, requests: list[Request], tokens: int) -> dict:
    """The float32 work of the requests: FLOPs of the weight matmuls (2 per weight per token; attention
    scores left out) and the weight bytes every decoding step reads."""
    d, inner, ff, experts = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.num_experts
    # Weights per token: attention, the FFN (dense, or the one expert picked), the router; a prompt token also
    # gets the decoder's cross-attention keys and values, a generated token the LM head.
    per_encoder_token = (config.num_layers * (4 * d * inner + 2 * d * ff)
                         + config.num_sparse_encoder_layers * d * experts + config.num_decoder_layers * 2 * d * inner)
    per_decoder_token = (config.num_decoder_layers * (6 * d * inner + 2 * d * ff)
                         + config.num_sparse_decoder_layers * d * experts + d * config.vocab_size)
    prompt_tokens = sum(len(r.prompt) for r in requests)
    decoder_bytes = 4 * (per_decoder_token + config.num_sparse_decoder_layers * (experts - 1) * 2 * d * ff)
    return {"flops": 2 * (prompt_tokens * per_encoder_token + tokens * per_decoder_token),
            "decoder_weight_bytes": decoder_bytes}


def run(shape: str = "base-8", requests: int = 32, rate: float | None = None, batch_size: int = 8,
        experts_per_actor: int | None = None, micro_batches: int = 1, cache: Path | None = None,
        seed: int = 0) -> dict:
    folder = (cache or Path.home() / ".cache" / "switch-serve" / "bench") / shape
    model = checkpoint(shape, folder)
    work = workload(requests, model.config.vocab_size, rate, seed, short=shape == "tiny")
    per_actor = experts_per_actor or experts_per_cpu(model.config.num_experts, os.cpu_count() or 1)
    results = [summarize("hf-single", *hf_run(model, work, 1)),
               summarize(f"hf-batch-{batch_size}", *hf_run(model, work, batch_size))]
    del model
    config = ServerConfig(model=str(folder), placement=PlacementConfig(experts_per_actor=per_actor),
                          micro_batches=micro_batches, max_sequences=max(32, requests), max_waiting=max(64, requests))
    ray.init(logging_level=logging.WARNING, include_dashboard=False, log_to_driver=False)
    try:
        with local_serve(config, http_port=free_port(), grpc_port=free_port()) as served:
            cluster_run(served.grpc, work[:2])  # warm
            results.append(summarize("cluster", *cluster_run(served.grpc, work)))
        where = breakdown(folder, work, per_actor, micro_batches)
    finally:
        ray.shutdown()
    cluster = results[-1]
    for r in results[:-1]:
        cluster.extra[f"tokens_per_s_vs_{r.system}"] = cluster.tokens_per_s / r.tokens_per_s
    return {"shape": shape, "requests": requests, "rate": rate, "experts_per_actor": per_actor,
            "micro_batches": micro_batches, "cpus": os.cpu_count(), "results": [asdict(r) for r in results],
            "breakdown": where}


def table(report: dict) -> str:
    arrival = "all at once" if not report["rate"] else f"arriving at {report['rate']}/s"
    lines = [f"{report['shape']}: {report['requests']} requests {arrival}, {report['cpus']} CPUs, "
             f"{report['experts_per_actor']} experts per actor, {report['micro_batches']} micro-batches",
             f"{'system':<12}{'tokens':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"]
    for r in report["results"]:
        lines.append(f"{r['system']:<12}{r['tokens']:>8}{r['tokens_per_s']:>9.1f}{r['ttft_p50']:>10.3f}"
                     f"{r['ttft_p99']:>10.3f}{r['tpot_p50']:>10.4f}{r['tpot_p99']:>10.4f}")
    for name, ratio in report["results"][-1]["extra"].items():
        lines.append(f"cluster {name.replace('_', ' ')}: {ratio:.2f}x")
    b = report["breakdown"]
    lines.append(f"cluster time, same requests through the Python API ({b['seconds']:.2f} s): front "
                 f"{b['front_s'] / b['seconds']:.0%}, sparse-layer round trips {b['round_trip_s'] / b['seconds']:.0%} "
                 f"({b['sparse_layer_calls']} calls, {b['round_trip_ms_per_call']:.2f} ms each) of which expert "
                 f"compute {b['expert_compute_s']:.2f} s over {b['actors']} actors; scatter/gather "
                 f"{b['scatter_gather_share']:.0%} of the time")
    lines.append(f"roofline: this machine does {b['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (float32 matmul) and "
                 f"{b['memory_bytes_per_s'] / 1e9:.1f} GB/s; the run achieved {b['flops_fraction']:.0%} of the "
                 f"FLOP/s and, reading every decoder weight once per step over {b['decode_steps']} steps, "
                 f"{b['bandwidth_fraction']:.0%} of the bandwidth")
    return "\n".join(lines)


def print_report(report: dict, as_json: bool) -> None:
    print(json.dumps(report) if as_json else table(report))
