"""The benchmark: the served cluster against transformers' `generate`, on the same checkpoint and requests.

    switch-serve bench                        # switch-base-8's shape, random float32 weights, both workloads
    switch-serve bench --model DIR            # any checkpoint
    switch-serve bench --shape tiny --concurrency 1,4 --json   # a quick run
    switch-serve bench --device cuda          # transformers, the front and the expert actors on the GPU
    switch-serve bench --dtype bf16           # both served in bfloat16 (default: the checkpoint's dtype)

For each workload (prompt and output lengths drawn at random, greedy decoding), in one run:
- transformers' `generate` on static, padded batches of 1 (one request at a time), 8, 16, each concurrency of the
  sweep, and all requests in one batch, in order;
- the cluster served over gRPC streams, at each concurrency of the sweep: that many clients, each sending its
  next request when the last one has finished; then at the lowest concurrency and with every request at once as
  unary calls (one whole answer each) beside the same as streams once more, each process's CPU counted in both by
  its role, which shows what the streams cost, and where;
- where the cluster's time goes: the same requests decoded through the Python API in a Ray worker set up like a
  Serve replica, all at once and one at a time, split into the front's compute (with the experts it computes
  itself), sending to the expert actors, waiting for them and their compute; the rest of the served time is
  Serve's proxy and the streams. With the front computing its node's experts (the default), this runs a second
  time with every expert computed by its actor, to show what the round trips cost.
Reported: output tokens per second (from the first request sent to the last token), time to first token and time
per output token (p50 and p99). transformers also decodes the first few requests one at a time before everything
and again after, so that a machine whose speed changed during the run (a shared VM's neighbours) says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import random
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import ray
import torch
from transformers import SwitchTransformersForConditionalGeneration

from cluster.app import front_env, local_serve, start_ray
from cluster.testing import free_port, percentile, tiny_config, write_random_checkpoint
from cluster.workloads import HF_BATCH_SIZES, SHAPES, WORKLOADS
from experts.ffn import KEPT_HEAP_ENV
from experts.fleet import compute_threads
from experts.placement import PlacementConfig, experts_per_cpu
from experts.spec import (
    DTYPES,
    SwitchConfig,
    expected_tensors,
    expert_bytes,
    expert_format,
    expert_tensor_names,
    sparse_layers,
)
from experts.wire import torch_dtype
from router_service.batching import Sequence, run_to_completion
from router_service.config import ServerConfig
from router_service.engine import SwitchCluster
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc
from router_service.requests import SamplingParams

# The processes of a served run on this node, by a word of their command lines (Ray names its workers by what they
# run); CPU seconds are counted for each, for the benchmark's own process ("client": the requests' gRPC clients), and
# for the rest of the machine (Ray's own processes, and anything else running).
PROCESS_ROLES = {"front": "SwitchServer", "Serve's proxy": "ProxyActor", "expert actors": "ExpertActor",
                 "expert fleet": "ExpertFleet"}


def cpu_seconds(proc: Path = Path("/proc")) -> dict[int, tuple[str, float]]:
    """Each process's role (PROCESS_ROLES, "client" for this one, else "rest") and the CPU seconds it has used, user
    and system, by pid; empty where there is no /proc (not Linux)."""
    tick, own, seconds = os.sysconf("SC_CLK_TCK"), os.getpid(), {}
    for entry in proc.glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
        role = "client" if int(entry.name) == own else next(
            (role for role, word in PROCESS_ROLES.items() if word in command), "rest")
        seconds[int(entry.name)] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return seconds


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds by role between two `cpu_seconds` (a process that ended between them is not counted)."""
    used: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        used[role] = used.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return used


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int


@dataclass
class Timing:
    sent: float | None = None
    first_token: float | None = None
    end: float | None = None
    token_ids: list[int] = field(default_factory=list)
    first_tokens: int = 1  # how many came at first_token: a stream's first chunk may carry several


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
    outputs: list[list[int]]  # each request's tokens


def summarize(system: str, timings: list[Timing]) -> Result:
    tokens = sum(len(t.token_ids) for t in timings)
    seconds = max(t.end for t in timings) - min(t.sent for t in timings)
    ttft = [t.first_token - t.sent for t in timings]
    tpot = [(t.end - t.first_token) / (len(t.token_ids) - t.first_tokens) for t in timings
            if len(t.token_ids) > t.first_tokens]
    return Result(system, tokens, seconds, tokens / seconds, percentile(ttft, 50), percentile(ttft, 99),
                  percentile(tpot, 50), percentile(tpot, 99), [t.token_ids for t in timings])


def workload(n: int, vocab: int, name: str, seed: int) -> list[Request]:
    (prompt_min, prompt_max), (output_min, output_max) = WORKLOADS[name]
    rng = random.Random(seed)
    return [Request([rng.randrange(3, vocab) for _ in range(rng.randint(prompt_min, prompt_max) - 1)] + [1],
                    rng.randint(output_min, output_max)) for _ in range(n)]


def checkpoint(shape: str) -> Path:
    """The benchmark checkpoint of a built-in shape, written once by transformers (random weights, float32) into the
    user's cache: into a folder beside, then renamed, so that a run stopped while writing leaves no half a
    checkpoint."""
    folder = Path.home() / ".cache" / "switch-serve" / "bench" / shape
    if not folder.is_dir():
        writing = folder.with_name(f"{folder.name}.writing-{os.getpid()}")
        shutil.rmtree(writing, ignore_errors=True)
        write_random_checkpoint(writing, tiny_config(**SHAPES[shape]), seed=0, max_shard_size="500MB")
        writing.rename(folder)
    return folder


class TokenClock:
    """A transformers streamer that notes when the batch got its first generated token, and when each row got its
    last: its end of sequence token, or the last of the tokens its request asked for (transformers decodes every row
    as far as the longest's)."""

    def __init__(self, max_new_tokens: list[int], eos: set[int]):
        self.max_new_tokens, self.eos = max_new_tokens, eos
        self.calls, self.first, self.ends = 0, None, [None] * len(max_new_tokens)

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 1:  # the decoder start token
            return
        now, made = time.perf_counter(), self.calls - 1  # each row's tokens so far
        if made == 1:
            self.first = now
        for row, token in enumerate(value.view(-1).tolist()):
            if self.ends[row] is None and (token in self.eos or made >= self.max_new_tokens[row]):
                self.ends[row] = now

    def end(self) -> None:
        pass


def gpu_setup() -> tuple[PlacementConfig, float]:
    """The expert placement and the front's GPUs for a run on the GPUs here: the front on one GPU, the experts on
    the others, two actors to a GPU. With one GPU, the actors take it from Ray and the front asks for none: Ray
    then leaves the front's CUDA_VISIBLE_DEVICES as this process's, so that it uses the same GPU. (Ray counting the
    one GPU twice failed to start where CUDA_VISIBLE_DEVICES names fewer, as containers and job schedulers set it.)"""
    gpus = torch.cuda.device_count()
    if gpus == 1:
        os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"  # Ray's default today; read by its workers
        return PlacementConfig(gpus=1, actors_per_gpu=2), 0.0
    return PlacementConfig(gpus=gpus - 1, actors_per_gpu=2), 1.0


# WARM: each system decodes each workload once, at its widest and unmeasured, before its measured runs. A process's
# first burst of many prompts is its first touch of the memory it keeps from then on (the fronts, and transformers
# here, keep what they free: see keep_freed_heap): served, the first two bursts of 32 prompts took 2.8-3.1 s to
# encode here, the later ones 1.3-1.5 s (docs/BENCHMARKS.md). A replica pays that once, after it starts; the runs
# measure serving after it.

# Requests of the first workload that transformers decodes one at a time at the start of a run and at its end.
SPEED_CHECK_REQUESTS = 8
# A change of the machine's speed between the two beyond which the table warns that the run's ratios are uncertain.
SPEED_DRIFT_WARNING = 0.10


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_heap() -> bool:
    """This process's allocator set as the fronts' and the expert actors' are (experts.ffn.KEPT_HEAP_ENV, which
    glibc reads as a process starts), so that transformers runs here with the same advantage: without it, its padded
    batches' activations over 32 MiB went back to the system as they were freed and were faulted in anew each pass
    (long prompts, 32 and 64 at once: 13-16% fewer tokens/s on a 2-vCPU VM). False where the C library has no
    mallopt (not glibc)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        return False
    return all(libc.mallopt(param, int(KEPT_HEAP_ENV[name])) == 1
               for param, name in ((M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
                                   (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_")))


def load_transformers(folder: Path, device: str, dtype: str | None):
    """transformers' model of the checkpoint on `device`, in `dtype` (a dtype option; default: the checkpoint's),
    as the cluster serves it."""
    model = SwitchTransformersForConditionalGeneration.from_pretrained(folder).eval()
    return model.to(device) if dtype is None else model.to(device, torch_dtype(dtype))


def hf_run(model, requests: list[Request], batch_size: int) -> list[Timing]:
    """transformers' generate over the requests in order, `batch_size` at a time (right-padded); each batch is
    sent when the one before it has finished."""
    timings: list[Timing] = [Timing() for _ in requests]
    eos = model.config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        ids = torch.zeros(len(batch), max(len(r.prompt) for r in batch), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, :len(r.prompt)], mask[row, :len(r.prompt)] = torch.tensor(r.prompt), 1
        clock, sent = TokenClock([r.max_new_tokens for r in batch], eos), time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 do_sample=False, streamer=clock, max_new_tokens=max(r.max_new_tokens for r in batch))
        for row, r in enumerate(batch):
            seq = out[row, 1:].tolist()[:r.max_new_tokens]  # a request takes only the tokens it asked for
            ends = [j for j, token in enumerate(seq) if token in eos]
            timings[i + row] = Timing(sent, clock.first, clock.ends[row], seq[:ends[0] + 1] if ends else seq)
    return timings


def cluster_run(address: str, requests: list[Request], concurrency: int, stream: bool = True) -> list[Timing]:
    """The requests as gRPC streams (or unary calls, whose first token comes with the last) against the served app,
    from `concurrency` clients that each send their next request when the last one has finished, in order."""
    timings = [Timing() for _ in requests]
    queue = iter(range(len(requests)))
    lock = threading.Lock()
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)  # connected before the clock starts
        stub = pb_grpc.SwitchServeStub(channel)

        def client() -> None:
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                r, t = requests[i], timings[i]
                t.sent = time.perf_counter()
                request = pb.GenerateRequest(input_ids=r.prompt, max_new_tokens=r.max_new_tokens)
                if not stream:
                    t.token_ids = list(stub.Generate(request, timeout=3600).token_ids)
                    t.first_token = t.end = time.perf_counter()
                    t.first_tokens = len(t.token_ids)
                    continue
                for chunk in stub.GenerateStream(request, timeout=3600):
                    if chunk.token_ids:  # the end is the last token's arrival, as transformers' streamer times it
                        t.end = time.perf_counter()
                        if t.first_token is None:
                            t.first_token, t.first_tokens = t.end, len(chunk.token_ids)
                    t.token_ids += chunk.token_ids

        threads = [threading.Thread(target=client) for _ in range(min(concurrency, len(requests)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return timings


@ray.remote(num_cpus=0)
class Echo:
    """A bare actor: the cost of a call alone, or with a read of memory in place of an expert's math."""

    def __init__(self, read_bytes: int):
        self.weights = torch.ones(read_bytes // 4)

    def echo(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        began = time.perf_counter()
        self.weights.sum()
        return x, time.perf_counter() - began


BARE_CALLS = 100


def front_bytes_between_trips(config: SwitchConfig, dtype: str) -> int:
    """What a decoding step's front reads, on average, between two sparse layers' round trips: the decoder's weights
    besides its experts and its embedding (of which a step reads a row), and the LM head, over the sparse layers."""
    sparse = sparse_layers(config, "decoder")
    experts = {name for layer in sparse for e in range(config.num_experts)
               for name in expert_tensor_names("decoder", layer, e)}
    head = "shared.weight" if config.tie_word_embeddings else "lm_head.weight"
    required, _ = expected_tensors(config)
    read = sum(math.prod(shape) for name, shape in required.items() if name == head or (
        name.startswith("decoder.") and name not in experts and name != "decoder.embed_tokens.weight"))
    return DTYPES[dtype].bytes * read // len(sparse)


def bare_call_ms(d_model: int, front_reads: int = 0, actor_reads: int = 0) -> float:
    """The median round trip of a call to a bare actor carrying one token's activations, less the actor's reading:
    Ray's own part of a sparse layer's round trip, the floor of its overhead. With `front_reads` and `actor_reads`,
    the caller reads that many bytes before each call, as a decoding front reads its weights between two round
    trips, and the actor as many during it, as an expert's math reads its weights: as in a decoding step, the caches
    no longer hold either process's state when the call starts and when it returns."""
    echo, x = Echo.remote(actor_reads), np.zeros((1, d_model), np.float32)
    weights = torch.ones(front_reads // 4)
    ray.get(echo.echo.remote(x))
    times = []
    for _ in range(BARE_CALLS):
        weights.sum()
        began = time.perf_counter()
        _, reading = ray.get(echo.echo.remote(x))
        times.append(time.perf_counter() - began - reading)
    ray.kill(echo)
    return 1000 * statistics.median(times)


def trips_compute_s(trips: list[list[int]], logs: list[list[float]]) -> dict[str, float]:
    """The experts' compute in the round trips, summed over them: all of it, each round trip's slowest actor's (the
    front waits for it), and the mean of its actors'. `trips`: the actors each round trip called; `logs[a]`: actor
    a's compute per call. An actor runs one caller's calls in the order they were made, so its n-th logged call is
    the n-th round trip that called it."""
    taken, slowest, mean = [0] * len(logs), 0.0, 0.0
    for called in trips:
        times = [logs[a][taken[a]] for a in called]
        for a in called:
            taken[a] += 1
        slowest, mean = slowest + max(times, default=0.0), mean + sum(times) / max(len(times), 1)
    if taken != [len(log) for log in logs]:
        raise RuntimeError(f"the actors logged {[len(log) for log in logs]} calls, the round trips made {taken}")
    return {"expert_compute_s": sum(map(sum, logs)), "slowest_compute_s": slowest, "mean_compute_s": mean}


def decode_timed(folder: Path, batches: list[list[Request]], placement: PlacementConfig, engine: dict,
                 threads: int) -> list:
    """Decode each batch of requests through the Python API, timing the front, the sparse-layer round trips (the
    front sending, then waiting) and the experts' compute inside them. Runs as a Ray task set up like a Serve
    replica (see `breakdown`), its math on `threads` threads. `engine`: EngineConfig's fields."""
    most = max(len(b) for b in batches)
    with SwitchCluster(folder, placement=placement, max_sequences=max(32, most), **engine) as model:
        model.batcher.threads = threads
        run_to_completion(model.batcher, [Sequence(r.prompt, SamplingParams(max_new_tokens=r.max_new_tokens))
                                          for r in batches[0]])  # warm (see WARM)
        dispatcher = model.front.dispatch

        def counters() -> dict:
            return {"seconds": time.perf_counter(), "sparse_layer_calls": dispatcher.calls,
                    "layers_computed_here": dispatcher.local_calls,
                    "round_trip_s": dispatcher.seconds, "sending_s": dispatcher.sending_seconds,
                    "decode_steps": model.batcher.steps}

        out = []
        for requests in batches:
            dispatcher.trips = []
            ray.get([a.log_calls.remote(True) for a in dispatcher.actors])
            before = counters()
            sequences = [Sequence(r.prompt, SamplingParams(max_new_tokens=r.max_new_tokens)) for r in requests]
            run_to_completion(model.batcher, sequences)
            after = counters()
            compute = trips_compute_s(dispatcher.trips, ray.get([a.log_calls.remote(False) for a in dispatcher.actors]))
            dispatcher.trips = None
            out.append({name: after[name] - before[name] for name in after} | compute | {
                "requests": len(requests), "actors": len(model.actors), "local_experts": engine["local_experts"],
                "tokens": sum(len(seq.token_ids) for seq in sequences)})
        config = model.checkpoint.config
        bare = {"bare_call_ms": bare_call_ms(config.d_model)}
        if model.front.device.type == "cpu":  # on a GPU, the weights' reads leave the CPU's caches alone
            front_reads = front_bytes_between_trips(config, model.dtype)
            actor_reads = expert_bytes(config, expert_format(model.dtype, engine["quantize"]))
            bare |= {"front_bytes_between_trips": front_reads, "expert_bytes": actor_reads,
                     "bare_call_in_step_ms": bare_call_ms(config.d_model, front_reads, actor_reads)}
        return [row | bare for row in out]


def breakdown(folder: Path, requests: list[Request], placement: PlacementConfig, engine: dict,
              front_gpus: float, threads: int) -> list[dict]:
    """Where the cluster's time goes, for all requests at once and for one request alone: the front's own compute,
    sending, waiting, and the experts' compute, from the requests decoded in a Ray worker with a replica's
    environment, threads and GPU (so without the proxy and the streams)."""
    timed = ray.remote(num_cpus=0, num_gpus=front_gpus,
                       runtime_env={"env_vars": front_env(engine["local_experts"])})(decode_timed)
    rows = []
    for t in ray.get(timed.remote(folder, [requests, requests[:1]], placement, engine, threads)):
        calls, trips = max(t["sparse_layer_calls"], 1), t["round_trip_s"]
        # The actors of one round trip compute at once: the front waits for the slowest, whose compute beyond
        # their mean is the imbalance between them.
        rows.append({**t, "front_s": t["seconds"] - trips, "waiting_s": trips - t["sending_s"],
                     "round_trip_ms_per_call": 1000 * trips / calls,
                     "overhead_ms_per_call": 1000 * max(0.0, trips - t["slowest_compute_s"]) / calls,
                     "imbalance_ms_per_call": 1000 * (t["slowest_compute_s"] - t["mean_compute_s"]) / calls})
    return rows


def run(folder: Path, workloads: list[str], concurrency: list[int], requests: int, options: dict, device: str,
        ingress: str, seed: int = 0) -> dict:
    """Each workload's `requests` requests (at a concurrency above that, as many as it keeps in flight) through
    transformers and through the served cluster (behind `ingress`), on the CPU or (`device` "cuda") the GPUs.
    `options`: the ServerConfig fields set (experts_per_actor for the placement on the CPU), the others their
    defaults."""
    options = dict(options)
    experts_per_actor = options.pop("experts_per_actor", None)
    # A batch and a queue with room for every request in flight.
    defaults = ServerConfig.model_fields
    server = ServerConfig(model=str(folder), **options,
                          max_sequences=max(defaults["max_sequences"].default, *concurrency),
                          max_waiting=max(defaults["max_waiting"].default, requests))
    engine = {name: getattr(server, name)
              for name in ("dtype", "micro_batches", "local_experts", "packed_weights", "quantize")}
    heap_kept = keep_freed_heap()
    hf_model = load_transformers(folder, device, server.dtype)
    config = hf_model.config
    work = {name: workload(max(requests, *concurrency), config.vocab_size, name, seed) for name in workloads}
    speed_check = work[workloads[0]][:SPEED_CHECK_REQUESTS]
    # Warm: a first generate on a GPU loads its kernels (unwarmed, the first check was the slowest of each GPU run's
    # three: 40-49 tok/s against 55-70).
    hf_run(hf_model, speed_check[:1], 1)
    speeds = [summarize("transformers-1", hf_run(hf_model, speed_check, 1)).tokens_per_s]
    report = {"model": str(folder), "requests": requests, "cpus": os.cpu_count(), "ingress": ingress, **engine,
              "transformers_threads": torch.get_num_threads(), "transformers_heap_kept": heap_kept,
              "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "workloads": {name: {"prompt_tokens": WORKLOADS[name][0], "output_tokens": WORKLOADS[name][1],
                                   "transformers": [], "cluster": [], "unary": []} for name in workloads}}
    # Static batches of each size over the requests; for a concurrency above `requests`, one batch of that many.
    sizes = sorted({*(s for s in HF_BATCH_SIZES if s <= requests), *concurrency, requests})
    # Each request's greedy tokens from transformers one at a time, the reference of every run: the batch of one's
    # run, and untimed for the requests beyond `requests` that a concurrency above it sends.
    reference = {name: [t.token_ids for t in hf_run(hf_model, pool[requests:], 1)] for name, pool in work.items()}
    for name, pool in work.items():
        hf_run(hf_model, pool[:sizes[-1]], sizes[-1])  # warm (see WARM)
        for size in sizes:
            label = "all" if size == requests > 1 else str(size)
            timings = hf_run(hf_model, pool[:max(requests, size)], size)
            report["workloads"][name]["transformers"].append(
                {"batch_size": label, **asdict(summarize(f"transformers-{label}", timings))})
    speeds.append(summarize("transformers-1", hf_run(hf_model, speed_check, 1)).tokens_per_s)  # before the cluster
    del hf_model
    if device == "cuda":
        placement, front_gpus = gpu_setup()
    else:
        per_actor = experts_per_actor or experts_per_cpu(config.num_experts, os.cpu_count() or 1)
        placement, front_gpus = PlacementConfig(experts_per_actor=per_actor), 0.0
    report["placement"] = placement.model_dump(exclude_defaults=True)
    server = server.model_copy(update={"placement": placement, "front_gpus": front_gpus})
    report["streams"] = {"interval_ms": server.stream_interval_ms, "chunks_per_s": server.stream_chunks_per_s}
    start_ray(ingress=ingress, include_dashboard=False, log_to_driver=False)
    report["front_threads"] = compute_threads(server.front_threads)  # as a replica counts them
    try:
        with local_serve(server, http_port=free_port(), grpc_port=free_port()) as served:
            pairs = 0
            for name, pool in work.items():
                cluster_run(served.grpc, pool[:max(requests, *concurrency)], max(concurrency))  # warm (see WARM)
                for c in concurrency:
                    timings = cluster_run(served.grpc, pool[:max(requests, c)], c)
                    report["workloads"][name]["cluster"].append(
                        {"concurrency": c, **asdict(summarize(f"cluster-{c}", timings))})
                for c in sorted({min(concurrency), max(c for c in concurrency if c <= requests)}):
                    # Streams and unary calls once more each, every process's CPU counted: what the streams cost where.
                    # Which runs first flips from pair to pair, so that a machine speeding up or slowing down over a
                    # run favours neither.
                    cpu, paired = {}, {}
                    order = (True, False) if pairs % 2 == 0 else (False, True)
                    pairs += 1
                    for stream in order:
                        before = cpu_seconds()
                        timings = cluster_run(served.grpc, pool[:requests], c, stream=stream)
                        cpu["streams" if stream else "unary"] = cpu_used(before, cpu_seconds())
                        paired[stream] = summarize(f"cluster-{'streams' if stream else 'unary'}-{c}", timings)
                    result = paired[False]
                    report["workloads"][name]["unary"].append(
                        {"concurrency": c, "system": result.system, "tokens": result.tokens,
                         "seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "outputs": result.outputs,
                         "cpu_s": cpu, "paired_streams_tokens_per_s": paired[True].tokens_per_s,
                         "unary_first": not order[0]})
        # A front on a GPU of its own has no experts beside it to compute: the breakdown with local_experts on would
        # be the one without, under another name.
        ways = [False] if front_gpus else list(dict.fromkeys([server.local_experts, False]))
        for name, pool in work.items():
            report["workloads"][name]["breakdown"] = [
                row for local in ways
                for row in breakdown(folder, pool[:requests], placement, engine | {"local_experts": local},
                                     front_gpus, report["front_threads"])]
    finally:
        ray.shutdown()
    hf_model = load_transformers(folder, device, server.dtype)
    hf_run(hf_model, speed_check[:1], 1)  # warm, as the first check was
    speeds.append(summarize("transformers-1", hf_run(hf_model, speed_check, 1)).tokens_per_s)
    report["speed_check"] = {"workload": workloads[0], "requests": len(speed_check), "tokens_per_s": speeds}
    for name, w in report["workloads"].items():  # greedy outputs must not depend on the system or the batch
        alone = next(r for r in w["transformers"] if r["batch_size"] == "1")["outputs"] + reference[name]
        for r in w["transformers"] + w["cluster"] + w["unary"]:
            outputs = r.pop("outputs")
            r["differing_outputs"] = sum(a != b for a, b in zip(outputs, alone[:len(outputs)], strict=True))
    return report


def comparisons(results: dict, requests: int) -> dict:
    """The cluster's ratios the targets are stated in, for one workload: with every request in flight at once
    (or the most it had), against transformers' best static batch and one request at a time; alone, its latency
    against transformers'."""
    hf = {r["batch_size"]: r for r in results["transformers"]}
    cluster = {r["concurrency"]: r for r in results["cluster"]}
    # Every batch size run over the same requests (one above `requests` runs more of them), one at a time included.
    static = [r for size, r in hf.items() if size == "all" or int(size) <= requests]
    best = max(static, key=lambda r: r["tokens_per_s"])
    top = max(c for c in cluster if c <= requests)
    out = {"best_static_batch_tokens_per_s": best["tokens_per_s"],
           f"cluster_{top}_vs_best_static_batch": cluster[top]["tokens_per_s"] / best["tokens_per_s"],
           f"cluster_{top}_vs_one_at_a_time": cluster[top]["tokens_per_s"] / hf["1"]["tokens_per_s"]}
    if 1 in cluster:
        out["tpot_vs_transformers_at_1"] = cluster[1]["tpot_p50"] / hf["1"]["tpot_p50"]
        out["ttft_vs_transformers_at_1"] = cluster[1]["ttft_p50"] / hf["1"]["ttft_p50"]
    return out


def latencies(r: dict) -> str:
    return f"{r['ttft_p50']:>6.2f}/{r['ttft_p99']:<6.2f} {r['tpot_p50']:>7.3f}/{r['tpot_p99']:<7.3f}"


def where_experts_run(local_experts: bool) -> str:
    return "the front computing its node's experts" if local_experts else "every expert in its actor"


def transformers_text(report: dict) -> str:
    if "transformers_threads" not in report:  # a report older than these keys: transformers kept no freed memory
        return "transformers' allocator glibc's default, "
    heap = "the fronts' allocator settings" if report["transformers_heap_kept"] else "its allocator's default"
    return f"transformers threads {report['transformers_threads']} and {heap}, "


def streams_text(streams: dict | None) -> str:
    if streams is None:  # a report of a build that sent a chunk every step
        return ""
    interval = f"every {streams['interval_ms']:g} ms" if streams["interval_ms"] else "every step"
    budget = f" and {streams['chunks_per_s']:g} a second a replica" if streams["chunks_per_s"] else ""
    return f", stream chunks at most {interval}{budget}"


def speed_line(check: dict) -> str:
    """What the speed check measured, and a warning where the machine's speed changed during the run."""
    start, before_cluster, end = check["tokens_per_s"]
    change = max(start, before_cluster, end) / min(start, before_cluster, end) - 1
    line = (f"the machine's speed: transformers one at a time on the first {check['requests']} requests of "
            f"{check['workload']}, {start:.1f} tok/s at the start, {before_cluster:.1f} before the cluster's runs, "
            f"{end:.1f} at the end (at most {change:.0%} apart)")
    if change > SPEED_DRIFT_WARNING:
        line += ": the machine's speed changed during the run, so its ratios are uncertain; run it again"
    return line


def table(report: dict) -> str:
    dtype = report.get("dtype") or "the checkpoint's"  # None, or absent from a report older than the option
    lines = [f"{report['model']}: {report['requests']} requests per workload, {report['cpus']} CPUs, "
             f"device {report['device']}, dtype {dtype}, ingress {report.get('ingress', 'proxy')}, "
             f"placement {report['placement']}, "
             f"front threads {report['front_threads']}, " + transformers_text(report) +
             f"{report['micro_batches']} micro-batches, "
             f"{where_experts_run(report['local_experts'])}, experts quantized: {report.get('quantize', 'none')}"
             + streams_text(report.get("streams"))]
    if "speed_check" in report:
        lines.append(speed_line(report["speed_check"]))
    for name, w in report["workloads"].items():
        hf = {r["batch_size"]: r for r in w["transformers"]}
        lines += ["", f"workload {name}: prompts {w['prompt_tokens'][0]}-{w['prompt_tokens'][1]} tokens, outputs "
                      f"{w['output_tokens'][0]}-{w['output_tokens'][1]}",
                  f"{'concurrency':>11} | {'cluster tok/s':>13} {'TTFT p50/p99':>13} {'TPOT p50/p99':>15} | "
                  f"{'transformers, batches of c':>26} {'TTFT p50/p99':>13} {'TPOT p50/p99':>15} | ratio"]
        for r in w["cluster"]:
            h = hf.get(str(r["concurrency"])) or hf["all"]
            lines.append(f"{r['concurrency']:>11} | {r['tokens_per_s']:>13.1f} {latencies(r)} | "
                         f"{h['tokens_per_s']:>26.1f} {latencies(h)} | {r['tokens_per_s'] / h['tokens_per_s']:.2f}x")
        lines.append("transformers static batches: " + ", ".join(f"{s}: {r['tokens_per_s']:.1f} tok/s"
                                                                 for s, r in hf.items()))
        streams = {r["concurrency"]: r["tokens_per_s"] for r in w["cluster"]}
        if w.get("unary"):
            lines.append("the same requests as unary calls (one whole answer each): " + ", ".join(
                f"concurrency {c}: {u['tokens_per_s']:.1f} tok/s (streams {streams[c]:.1f})"
                for u in w["unary"] for c in [u["concurrency"]]))
            lines += [cpu_line(u) for u in w["unary"] if u.get("cpu_s")]
        differing = {r["system"]: r["differing_outputs"] for r in w["transformers"] + w["cluster"] + w.get("unary", [])
                     if r["differing_outputs"]}
        lines.append(f"requests whose tokens differ from transformers one at a time: {differing or 'none'}")
        targets = comparisons(w, report["requests"])
        lines.append("targets: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in targets.items()))
        for b in w["breakdown"]:
            share = {part: b[f"{part}_s"] / b["seconds"] for part in ("front", "sending", "waiting")}
            lines.append(f"Python API, {where_experts_run(b['local_experts'])}, {b['requests']} request(s) at once: "
                         f"{b['seconds']:.2f} s over "
                         f"{b['decode_steps']} steps ({1000 * b['seconds'] / b['decode_steps']:.0f} ms each): front "
                         f"{share['front']:.0%}, sending {share['sending']:.0%}, waiting {share['waiting']:.0%} "
                         f"({b['layers_computed_here']} sparse layers computed by the front; "
                         f"{b['sparse_layer_calls']} round trips of {b['round_trip_ms_per_call']:.2f} ms, "
                         f"{b['overhead_ms_per_call']:.2f} ms of it beyond the slowest actor's compute, "
                         f"{b['imbalance_ms_per_call']:.2f} ms between its compute and their mean; a bare actor call "
                         f"carrying one token, {b['bare_call_ms']:.2f} ms back to back{in_step(b)})")
    return "\n".join(lines)


def cpu_line(unary: dict) -> str:
    """The CPU seconds each kind of process used, the requests as streams against unary calls (a run of each)."""
    cpu = unary["cpu_s"]
    roles = [*PROCESS_ROLES, "client", "rest"]
    first = "unary calls" if unary.get("unary_first") else "streams"  # reports before the order flipped: streams
    return (f"CPU seconds at concurrency {unary['concurrency']}, streams against unary calls (a run of each, {first} "
            f"first, {unary['paired_streams_tokens_per_s']:.1f} against {unary['tokens_per_s']:.1f} tok/s): "
            + ", ".join(f"{role} {cpu['streams'].get(role, 0):.2f}/{cpu['unary'].get(role, 0):.2f}" for role in roles))


def in_step(b: dict) -> str:
    """The bare call's floor as in a decoding step on the CPU, as the table says it."""
    if "bare_call_in_step_ms" not in b:
        return ""
    return (f", {b['bare_call_in_step_ms']:.2f} ms as in a decoding step: the front reading "
            f"{b['front_bytes_between_trips'] / 2**20:.1f} MiB before it, the actor {b['expert_bytes'] / 2**20:.1f} "
            f"MiB during it")


def plot(report: dict, path: str) -> None:
    """Output tokens/s against concurrency, the cluster and transformers, one panel per workload."""
    import matplotlib  # an optional dependency: pip install '.[bench]'

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, (name, w) in zip(axes[0], workloads.items()):
        hf = {r["batch_size"]: r for r in w["transformers"]}
        points = [r["concurrency"] for r in w["cluster"]]
        ax.plot(points, [r["tokens_per_s"] for r in w["cluster"]], "o-", label="switch-serve")
        ax.plot(points, [(hf.get(str(c)) or hf["all"])["tokens_per_s"] for c in points], "s--",
                label="transformers, static batches of c")
        ax.axhline(hf["1"]["tokens_per_s"], color="gray", linestyle=":", label="transformers, one at a time")
        ax.set_xscale("log", base=2)
        ax.set_xticks(points, [str(c) for c in points])
        ax.set(title=f"{name}: prompts {w['prompt_tokens'][0]}-{w['prompt_tokens'][1]}, outputs "
                     f"{w['output_tokens'][0]}-{w['output_tokens'][1]}", xlabel="concurrent requests",
               ylabel="output tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_report(report: dict, as_json: bool) -> None:
    print(json.dumps(report) if as_json else table(report))
