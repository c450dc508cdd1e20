"""The placement planner: every (stack, sparse layer, expert) onto a GPU (one expert actor per GPU), within a
memory budget, balancing the expected load and giving the hottest experts extra replicas.

    switch-serve plan --config switch-c-2048.json --gpus 48 --gpu-memory 80GiB --json
"""

from __future__ import annotations

import heapq
import json
import math
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from experts.spec import (
    DTYPE_OF_TORCH,
    DTYPES,
    EXPERT_FORMATS,
    EXPERT_TENSOR,
    STACKS,
    ExpertKey,
    SwitchConfig,
    expected_tensors,
    expert_bytes,
    follow_weights,
    router_tensor_name,
    sparse_layers,
)

ACTIVATION_RESERVE = 0.10  # of each GPU's memory, left for activations and the CUDA context
PLAN_DTYPE = "bf16"  # what experts are planned in when no dtype is given, and the front with int8 experts


class PlanError(ValueError):
    pass


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '40 GiB', '1.5TiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise PlanError(f"gpu_memory: cannot read {text!r} (try 80GiB)")
    number, unit, binary = match.groups()
    base = 1024 if binary or not unit else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def front_bytes(config: SwitchConfig, dtype: str) -> int:
    """The non-expert weights (embeddings, attention, norms, dense FFNs, routers, LM head) as the front holds them: in
    `dtype`, one of DTYPES, and the routers in their `router_dtype`, as transformers computes them."""
    routers = {router_tensor_name(stack, layer, which) for stack in STACKS for layer in sparse_layers(config, stack)
               for which in ("weight", "bias")}
    router_bytes = DTYPES[DTYPE_OF_TORCH[config.router_dtype]].bytes
    required, _ = expected_tensors(config)
    return sum(math.prod(shape) * (router_bytes if name in routers else DTYPES[dtype].bytes)
               for name, shape in required.items() if not EXPERT_TENSOR.match(name))


@dataclass
class GpuPlan:
    gpu: int
    node: int
    experts: list[ExpertKey] = field(default_factory=list)
    bytes: int = 0
    load: float = 0.0


@dataclass
class Plan:
    gpus: list[GpuPlan]
    expert_bytes: int
    front_bytes: int
    budget_bytes: int
    min_gpus: int  # the fewest GPUs of this memory that hold every expert
    replicas: dict[str, int]  # "stack.layer.expert" -> copies, for experts with more than one
    warnings: list[str]

    @property
    def num_actors(self) -> int:
        return sum(1 for g in self.gpus if g.experts)

    def to_json(self) -> dict:
        loads = [g.load for g in self.gpus]
        return {
            "num_gpus": len(self.gpus), "num_actors": self.num_actors, "expert_bytes": self.expert_bytes,
            "front_bytes": self.front_bytes, "budget_bytes_per_gpu": self.budget_bytes,
            "min_gpus": self.min_gpus,
            "max_gpu_bytes": max(g.bytes for g in self.gpus),
            "load_imbalance": max(loads) / (sum(loads) / len(loads)) if sum(loads) else 1.0,
            "replicas": self.replicas, "warnings": self.warnings,
            "gpus": [{"gpu": g.gpu, "node": g.node, "experts": g.experts, "bytes": g.bytes, "load": g.load}
                     for g in self.gpus],
        }


def make_plan(config: SwitchConfig, *, gpus: int, gpu_memory: int, nodes: int = 1, dtype: str = PLAN_DTYPE,
              replicate_hot: int = 0, stats: dict[ExpertKey, float] | None = None) -> Plan:
    """Spread experts, held in `dtype` (EXPERT_FORMATS), over GPUs, heaviest expected load first, each to the
    least-loaded GPU with room (longest-processing-time scheduling); the `replicate_hot` busiest experts get a
    second copy that halves their load."""
    for name, count in (("gpus", gpus), ("nodes", nodes)):
        if count < 1:
            raise PlanError(f"{name}: must be at least 1, got {count}")
    if gpus % nodes:
        raise PlanError(f"gpus: {gpus} GPUs cannot be spread evenly over {nodes} nodes")
    if replicate_hot and gpus < 2:
        raise PlanError("replicate_hot: replicas need at least 2 GPUs")
    if dtype not in EXPERT_FORMATS:
        raise PlanError(f"dtype: one of {', '.join(EXPERT_FORMATS)}, got {dtype!r}")
    config, warnings = follow_weights(config)
    size = expert_bytes(config, dtype)
    budget = int(gpu_memory * (1 - ACTIVATION_RESERVE))
    keys = [(stack, layer, e) for stack in STACKS for layer in sparse_layers(config, stack)
            for e in range(config.num_experts)]
    if replicate_hot > len(keys):
        raise PlanError(f"replicate_hot: {replicate_hot} is more than the model's {len(keys)} experts")
    unknown = sorted(set(stats or {}) - set(keys))
    if unknown:
        stack, layer, e = unknown[0]
        raise PlanError(f"stats: {stack}.{layer} has no expert {e} in this model (its sparse layers: "
                        f"{', '.join(f'{s}.{i}' for s in STACKS for i in sparse_layers(config, s))}; "
                        f"{config.num_experts} experts each)")
    if replicate_hot and not stats:  # every load the same, the copies would go to the first experts listed
        raise PlanError("replicate_hot: needs stats (the token counts of `switch-serve stats`) to tell the busiest "
                        "experts")
    load = {key: float((stats or {}).get(key, 1.0)) for key in keys}
    hot = sorted(keys, key=lambda k: -load[k])[:replicate_hot]
    copies = {key: 2 if key in hot else 1 for key in keys}
    total = sum(copies.values())
    per_gpu = budget // size
    if not per_gpu:
        raise PlanError(f"gpu_memory: {gpu_memory / 2**20:.0f} MiB ({1 - ACTIVATION_RESERVE:.0%} usable) holds no "
                        f"expert of {size / 2**20:.0f} MiB")
    min_gpus = max(math.ceil(total / per_gpu), 2 if replicate_hot else 1)  # an expert's two copies: two GPUs
    if min_gpus > gpus:
        raise PlanError(f"gpus: {total} experts of {size / 2**20:.0f} MiB need at least {min_gpus} GPUs of "
                        f"{gpu_memory / 2**30:.0f} GiB ({1 - ACTIVATION_RESERVE:.0%} usable); {gpus} given")
    shares = sorted(((load[k] / copies[k], k) for k in keys for _ in range(copies[k])), key=lambda x: -x[0])
    # Heaviest first; where that leaves a second copy no GPU but its twin's, the replicated experts first instead,
    # while every GPU has room for a copy apart from its twin.
    twins_first = sorted(shares, key=lambda x: copies[x[1]] == 1)
    plan = (assign(shares, gpus, nodes, per_gpu, size, copies)
            or assign(twins_first, gpus, nodes, per_gpu, size, copies)
            or assign(twins_first, gpus, nodes, per_gpu, size, copies, emptiest_first=True))
    if plan is None:
        raise PlanError("replicate_hot: the GPUs with room left for a second copy of an expert all hold its first")
    for g in plan:
        g.experts.sort()
    replicas = {".".join(map(str, k)): n for k, n in copies.items() if n > 1}
    front_dtype = dtype if dtype in DTYPES else PLAN_DTYPE  # int8 quantizes the experts only
    return Plan(plan, size, front_bytes(config, front_dtype), budget, min_gpus, replicas, warnings)


def assign(shares: list[tuple[float, ExpertKey]], gpus: int, nodes: int, per_gpu: int, size: int,
           copies: dict[ExpertKey, int], emptiest_first: bool = False) -> list[GpuPlan] | None:
    """Each (share of load, expert) in order to the least-loaded GPU with room (longest-processing-time scheduling),
    or with `emptiest_first` to the GPU with the most room (which finds every replica a GPU apart from its twin
    wherever there is room for all), a replica to another GPU than its twin; None where one finds no such GPU."""
    per_node = gpus // nodes
    plan = [GpuPlan(gpu=i, node=i // per_node) for i in range(gpus)]
    # Of GPUs alike, one node's after another's in turn, so that the experts spread evenly over the nodes.
    turn = [(i % per_node) * nodes + i // per_node for i in range(gpus)]

    def entry(i: int) -> tuple:  # the heap's order of the GPUs with room
        g = plan[i]
        return (len(g.experts), g.load, turn[i], i) if emptiest_first else (g.load, len(g.experts), turn[i], i)

    heap = [entry(i) for i in range(gpus)]
    heapq.heapify(heap)
    for share, key in shares:
        skipped = []
        while copies[key] > 1 and key in plan[heap[0][-1]].experts:  # a replica goes to another GPU than its twin
            skipped.append(heapq.heappop(heap))
            if not heap:
                return None
        g = plan[heapq.heappop(heap)[-1]]
        g.experts.append(key)
        g.bytes += size
        g.load += share
        if len(g.experts) < per_gpu:
            heapq.heappush(heap, entry(g.gpu))
        for passed_over in skipped:
            heapq.heappush(heap, passed_over)
    return plan


def stats_json(counts: dict[tuple[str, int], list[int]]) -> dict[str, list[int]]:
    """Tokens per expert, {(stack, layer): [...]}, in the file format `read_stats` takes."""
    return {f"{stack}.{layer}": list(tokens) for (stack, layer), tokens in counts.items()}


def read_stats(path: str) -> dict[ExpertKey, float]:
    """Token counts as `{"encoder.1": [tokens per expert], ...}` (what the running cluster reports)."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:  # missing on the node that reads it (a served fleet's), say
        raise PlanError(f"stats: {path} cannot be read on {platform.node()} ({e.strerror})") from None
    except ValueError as e:  # a JSONDecodeError, bytes that are not UTF-8
        raise PlanError(f"stats: {path} is not JSON ({e})") from None

    def refused(found) -> PlanError:
        return PlanError(f"stats: {path}: expected {{\"encoder.1\": [tokens per expert], ...}}, got "
                         f"{json.dumps(found)[:80]}")

    if not isinstance(raw, dict):
        raise refused(raw)
    stats = {}
    for layer, counts in raw.items():
        stack, _, index = layer.partition(".")
        # Counts of tokens: JSON's NaN, Infinity, negatives and booleans would order the experts arbitrarily.
        if not (index.isdigit() and isinstance(counts, list) and all(
                isinstance(n, (int, float)) and not isinstance(n, bool) and 0 <= n < math.inf for n in counts)):
            raise refused({layer: counts})
        stats |= {(stack, int(index), e): float(n) for e, n in enumerate(counts)}
    return stats
