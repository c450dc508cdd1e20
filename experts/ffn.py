"""The expert feed-forward math: transformers' non-gated `wi -> act -> wo`, over tokens grouped by expert. The
weights are tensors or int8 (experts.int8)."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from experts import int8
from experts.int8 import Int8Weight


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A float weight on the CPU and a copy of it in oneDNN's blocked layout, made once: PyTorch's prepacked linear
    (what its compiler's CPU backend runs) computes from the copy without the packing that a plain product of several
    rows does at every call. See `linear` for which products use it."""

    weight: torch.Tensor
    packed: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape


Weight = torch.Tensor | Int8Weight | PackedWeight
# transformers' activations (ACT2FN) of experts.spec.ACTIVATIONS in torch alone: importing transformers.activations
# takes seconds (it pulls in torch's compiler and distributed packages), which every expert actor would pay at each
# start and restart. A test keeps these equal to ACT2FN's.
def new_gelu(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation, op by op: in half precision each op rounds, so F.gelu's tanh form, which
    rounds once, gives other values (and other tokens)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATION_FUNCTIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": new_gelu,
                        "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "silu": F.silu, "swish": F.silu}

# A matrix at least this large is computed on every core when a product runs on one OpenMP thread (see
# linear_on_cores): smaller ones take less time than handing the work to other threads.
SPLIT_MIN_BYTES = 4 << 20

# A product of at least this many rows by a PackedWeight of the dtype runs on its packed copy, fewer rows on the weight
# itself (see `linear`); the dtypes that get packed copies.
PACKED_MIN_ROWS = {torch.float32: 4, torch.bfloat16: 1}
# A product of more rows than this by a PackedWeight runs on the weight itself: a decoding step's products have at most
# a batch's rows, an encoder pass's have as many as its prompts' tokens, a count that changes with every batch of
# prompts. oneDNN builds kernels for each new count of rows by a packed copy (about 1 ms each), MKL's F.linear builds
# none, and at that many rows the two compute as fast: encoder passes over 32 prompts took 1.0-1.2 s instead of
# 1.7-1.9 (docs/BENCHMARKS.md).
PACKED_MAX_ROWS = 64
# oneDNN lays a packed copy out for products of about this many rows; it serves any count.
PACKED_FOR_ROWS = 4
# A float32 product on the CPU of two to this many rows by a weight of at least MEASURED_MIN_BYTES runs whichever way
# is faster on this machine, `x @ weight.T` or `weight @ x.T` (see `linear`). Smaller ones are not worth measuring.
TRANSPOSED_MAX_ROWS = 64
MEASURED_MIN_BYTES = 1 << 20
# The weights whose one-row products decide whether core threads pay here (see parts_beat_openmp): four of a
# switch-base-8 expert's wi in float32, the products a decoding step runs most, more than a cache holds; as many bytes
# of them in another dtype.
PROBE_WEIGHTS = (4, 3072, 768)
# A choice between ways of computing is timed at these uses: a timing taken while other work held the cores (a
# replica starting beside its expert actors, say) gives way to the quieter ones that follow.
TIMED_AT_USES = (1, 16, 256, 4096)

# The environment of the processes that compute (the fronts and the expert actors): glibc's malloc keeps up to 1 GiB
# that the tensors free for the next ones, where by default it gives a large block back to the system as it is freed
# (over a bound that rises from 128 KiB to 32 MiB, and its heap's free top over twice that). On a VM, each 4 KiB page
# a process touches anew costs a page fault (4-18 us here): encoder passes over 32 prompts touched 55-370 MB anew
# each time, and took 1.1 s instead of 1.7-1.9 with the memory kept (docs/BENCHMARKS.md). A thread's own arena still
# gives back blocks over 64 MiB.
KEPT_HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def packs(dtype: torch.dtype) -> bool:
    """Whether a float weight of `dtype` on the CPU gets a packed copy (see pack): bfloat16 only on CPUs whose
    instructions oneDNN computes it with (AVX-512's or AVX-NE-CONVERT; elsewhere its packing refuses bfloat16)."""
    if dtype not in PACKED_MIN_ROWS or not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack(weight: Weight) -> Weight:
    """`weight` with a packed copy (PackedWeight) where products can use one: a float32 or bfloat16 tensor on a CPU
    with oneDNN (bfloat16 where it computes it, see `packs`); else `weight` itself. The copy takes as much memory
    again."""
    if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu" or not packs(weight.dtype):
        return weight
    return PackedWeight(weight, torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACKED_FOR_ROWS))


def unpacked(weight: Weight) -> torch.Tensor | Int8Weight:
    return weight.weight if isinstance(weight, PackedWeight) else weight


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """F.linear(x, weight), int8 weights as experts.int8.linear.

    A PackedWeight's copy computes products of PACKED_MIN_ROWS to PACKED_MAX_ROWS rows. On an Intel Xeon (2 cores,
    96 of switch-base-8's expert weights in turn, as a decoding step reads them from memory; cluster.bench_experts),
    in float32 F.linear took 61-63 ms at 4 rows, 79-82 at 8, 102 at 32 and 228-243 at 128, where the packed copy took
    39-44, 47-49, 83-87 and 206-215; at 1 to 3 rows F.linear is as fast or faster (32-40 ms), and those products
    run on the weight itself, as below. In bfloat16 the copy is faster from one row: 21-23 ms against 28-30 at 1 row,
    25-28 against 34-36 at 32. At 512 rows the two are within the run-to-run noise of each other in either dtype
    (docs/BENCHMARKS.md).

    For a few rows of x on the CPU by the weight itself, MKL's x @ weight.T runs far below memory speed on some CPUs
    and barely faster on two OpenMP threads, where weight @ x.T (a tall matrix by a thin one) is another kernel that
    takes 0.3-0.8 times as long (an AMD EPYC); on others x @ weight.T is the faster of the two (an Intel Xeon, up to
    half the time at 2 to 4 rows). So both ways are timed on products of each weight shape, count of rows (to the
    next power of two) and of OpenMP threads (see Timings), and the faster one runs (docs/BENCHMARKS.md)."""
    if isinstance(weight, Int8Weight):
        return int8.linear(x, weight)
    rows = x.numel() // x.shape[-1]
    if isinstance(weight, PackedWeight):
        if PACKED_MIN_ROWS[weight.dtype] <= rows <= PACKED_MAX_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, weight.packed, None, "none", [], "")
        weight = weight.weight
    if (weight.device.type == "cpu" and weight.dtype == torch.float32 and 2 <= rows <= TRANSPOSED_MAX_ROWS
            and weight.numel() * weight.element_size() >= MEASURED_MIN_BYTES and transposed_is_faster(x, weight)):
        return transposed(x, weight)
    return F.linear(x, weight)


def transposed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) computed as weight @ x.T."""
    rows = x.numel() // x.shape[-1]
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    return out.view(*x.shape[:-1], weight.shape[0])


class Timings:
    """The shortest time each of several ways of computing one thing has taken here, over the timings taken at the
    uses in TIMED_AT_USES."""

    def __init__(self, ways: int):
        self.best, self.uses = [float("inf")] * ways, 0

    def due(self) -> bool:
        """Count a use; whether to time the ways at this one."""
        self.uses += 1
        return self.uses in TIMED_AT_USES

    def add(self, seconds: list[float]) -> None:
        self.best = [min(best, new) for best, new in zip(self.best, seconds)]


# (weight shape, rows to the next power of two, OpenMP threads) -> F.linear's and weight @ x.T's Timings
_transposed_timings: defaultdict[tuple[int, int, int, int], Timings] = defaultdict(partial(Timings, 2))


def transposed_is_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether weight @ x.T beats F.linear for products like this one here, timed on this one when due."""
    rows = x.numel() // x.shape[-1]
    timings = _transposed_timings[(*weight.shape, 1 << (rows - 1).bit_length(), torch.get_num_threads())]
    if timings.due():
        timings.add(best_seconds(lambda: F.linear(x, weight), lambda: transposed(x, weight)))
    by_rows, turned = timings.best
    return turned < by_rows


def best_seconds(*ways, repeats: int = 3) -> list[float]:
    """Each way's shortest time over `repeats` runs, the ways taking turns after one run each to warm up."""
    for way in ways:
        way()
    best = [float("inf")] * len(ways)
    for _ in range(repeats):
        for i, way in enumerate(ways):
            began = time.perf_counter()
            way()
            best[i] = min(best[i], time.perf_counter() - began)
    return best


def expert_ffn(x: torch.Tensor, wi: Weight, wo: Weight, act, threads: CoreThreads | None = None) -> torch.Tensor:
    """One expert applied to x [tokens, d_model]; with `threads`, see linear_on_cores."""
    h = act(linear_on_cores(x, wi, threads))
    if not isinstance(wo, Int8Weight) and h.dtype != wo.dtype:  # as transformers does before its `wo`
        h = h.to(wo.dtype)
    return linear_on_cores(h, wo, threads)


def stacked_ffn(x: torch.Tensor, expert: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, act) -> torch.Tensor:
    """Each token of x [tokens, d_model] through its expert (`expert` [tokens]), every expert's weights stacked (wi
    [experts, d_ff, d_model], wo [experts, d_model, d_ff]): every token through every expert, then each token's own
    output taken. On a GPU that is a few kernels and no wait for the device, where grouping the tokens by expert
    reads their experts back to the host and launches a few kernels per expert; for a few tokens, the extra math
    costs less than those."""
    h = act(torch.matmul(x, wi.transpose(1, 2)))  # [experts, tokens, d_ff]
    if h.dtype != wo.dtype:  # as transformers does before its `wo`
        h = h.to(wo.dtype)
    out = torch.matmul(h, wo.transpose(1, 2))  # [experts, tokens, d_model]
    return out.gather(0, expert.view(1, -1, 1).expand(1, -1, out.shape[-1])).squeeze(0)


class CoreThreads:
    """Threads that compute the parts of one large product at once, each on one OpenMP thread (linear_on_cores)."""

    def __init__(self, n: int):
        self.n = n
        caller = torch.get_num_threads()
        started = threading.Barrier(n + 1)

        def one_openmp_thread() -> None:
            torch.get_num_threads()  # torch sets a thread's count at its first use: let it, then set ours
            torch.set_num_threads(1)
            started.wait()

        self.pool = ThreadPoolExecutor(n, thread_name_prefix="switch-serve-cores", initializer=one_openmp_thread)
        for _ in range(n):  # each task blocks its thread until all have started, so n threads start
            self.pool.submit(lambda: None)
        started.wait()
        # torch.set_num_threads is also the count that threads started later begin with: put the caller's back.
        torch.set_num_threads(caller)

    def close(self) -> None:
        self.pool.shutdown(wait=False)


_core_threads: CoreThreads | None = None
# (cores, dtype) -> parts_beat_openmp's
_parts_timings: defaultdict[tuple[int, torch.dtype], Timings] = defaultdict(partial(Timings, 2))
_core_threads_lock = threading.Lock()


def core_threads(n: int | None = None, dtype: torch.dtype = torch.float32) -> CoreThreads | None:
    """This process's threads for math on several cores at once, one core each; with `n`, started (or started
    again with n threads) unless they run already. None while fewer than two cores are to be used, and where they
    do not pay for weights of `dtype` (parts_beat_openmp, timed at the calls with `n` in TIMED_AT_USES): then every
    product runs on the caller's OpenMP threads."""
    global _core_threads
    with _core_threads_lock:
        if n is None:
            return _core_threads
        current = _core_threads if _core_threads is not None and _core_threads.n == n else None
        if _core_threads is not None and current is None:
            _core_threads.close()
        _core_threads = None
        if n < 2:
            return None
        timings = _parts_timings[(n, dtype)]
        if timings.due():
            current = current or CoreThreads(n)
            timings.add(openmp_and_parts_seconds(current, dtype))
        if parts_beat_openmp(timings):
            _core_threads = current or CoreThreads(n)
        elif current is not None:
            current.close()
        return _core_threads


def parts_beat_openmp(timings: Timings) -> bool:
    """Whether one row by a large weight is computed at least 10% faster cut into a part per core thread than on as
    many OpenMP threads (`timings`: openmp_and_parts_seconds'). So in float32 on an AMD EPYC, where MKL reads the
    weight at about half of memory speed on one core and no faster on two OpenMP threads; not on an Intel Xeon, whose
    OpenMP threads take 0.4 times as long as the parts, nor in bfloat16 on that EPYC, where the parts took twice as
    long (docs/BENCHMARKS.md). Where the parts win, a decoding step of one sequence runs on one OpenMP thread with its
    large products on the core threads (router_service.batching.ONE_THREAD_UP_TO)."""
    openmp, parts = timings.best
    return parts < 0.9 * openmp


def openmp_and_parts_seconds(threads: CoreThreads, dtype: torch.dtype = torch.float32) -> list[float]:
    """The time one row by PROBE_WEIGHTS in `dtype` takes on as many OpenMP threads as `threads` has, and cut into a
    part per core thread; the caller keeps its OpenMP threads."""
    count, rows, columns = PROBE_WEIGHTS
    weights = [torch.randn(rows, columns).to(dtype) for _ in range(count * torch.float32.itemsize // dtype.itemsize)]
    x = torch.randn(1, columns).to(dtype)
    caller = torch.get_num_threads()

    def on_openmp_threads() -> None:
        torch.set_num_threads(threads.n)
        for weight in weights:
            F.linear(x, weight)

    def in_parts() -> None:
        torch.set_num_threads(1)
        for weight in weights:
            linear_on_cores(x, weight, threads)

    try:
        with torch.inference_mode():
            return best_seconds(on_openmp_threads, in_parts, repeats=10)
    finally:
        torch.set_num_threads(caller)


def linear_on_cores(x: torch.Tensor, weight: Weight, threads: CoreThreads | None) -> torch.Tensor:
    """`linear(x, weight)`. With `threads`, from a thread that runs one OpenMP thread, one row of x by a large float
    weight on the CPU is cut by output rows into one part per thread, all computed at once, one core each (where core
    threads run, see parts_beat_openmp: on an AMD EPYC, switch-base-8's LM head took 7.1 ms on one core and 4.0 ms in
    two parts; each output is the same dot product either way)."""
    plain = unpacked(weight)
    if (threads is None or isinstance(plain, Int8Weight) or plain.device.type != "cpu"
            or plain.nbytes < SPLIT_MIN_BYTES or torch.get_num_threads() > 1 or x.numel() > x.shape[-1]):
        return linear(x, weight)
    out = x.new_empty(*x.shape[:-1], plain.shape[0])
    bounds = [plain.shape[0] * i // threads.n for i in range(threads.n + 1)]

    def part(lo: int, hi: int) -> None:
        with torch.inference_mode():
            out[..., lo:hi] = linear(x, plain[lo:hi])

    others = [threads.pool.submit(part, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    part(bounds[0], bounds[1])
    for done in others:
        done.result()
    return out


def grouped_ffn(x: torch.Tensor, counts: list[int], weights: list[tuple[Weight, Weight]], act) -> torch.Tensor:
    """x holds the tokens of several experts back to back (counts[i] rows for weights[i]); same order out. The experts
    run in turn, each on the caller's OpenMP threads: with different experts at once on the core threads, one core
    each, 32 requests at once on 2 cores took 9.9-11.8 s instead of 8.4-9.3, the caller's idle OpenMP threads
    spinning on the cores they needed (docs/BENCHMARKS.md)."""
    out = torch.empty(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for (wi, wo), rows in zip(weights, counts):
        if rows:
            out[start:start + rows] = expert_ffn(x[start:start + rows], wi, wo, act)
        start += rows
    return out
