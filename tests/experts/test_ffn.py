"""The expert FFN: its activations, computed with torch alone, equal transformers' ACT2FN of the same name; a product
of a few rows runs the way measured faster here, x @ weight.T or weight @ x.T, and gives F.linear's result, and so do
products by a packed copy of the weight; one row by a large weight, from a thread on one OpenMP thread, is split over
the core threads and gives F.linear's result; core threads run only where they are measured to pay."""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from experts import ffn, int8
from experts.ffn import (
    ACTIVATION_FUNCTIONS,
    PACKED_MAX_ROWS,
    PACKED_MIN_ROWS,
    SPLIT_MIN_BYTES,
    TRANSPOSED_MAX_ROWS,
    CoreThreads,
    PackedWeight,
    core_threads,
    expert_ffn,
    grouped_ffn,
    linear,
    linear_on_cores,
    pack,
    packs,
    stacked_ffn,
    transposed_is_faster,
)
from experts.spec import ACTIVATIONS


def test_every_served_activation_has_a_function():
    assert set(ACTIVATION_FUNCTIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_equals_transformers(name, dtype):
    """Bit for bit, in every dtype served: in half precision, two forms of one function round differently (F.gelu's
    tanh form against transformers' gelu_new, op by op, differed in 42% of bfloat16 values, and changed tokens)."""
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    ours, theirs = ACTIVATION_FUNCTIONS[name](x), ACT2FN[name](x)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name


@pytest.fixture(scope="module")
def expert_threads():
    threads = CoreThreads(2)
    yield threads
    threads.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_experts_give_each_token_its_own_experts_output(dtype):
    torch.manual_seed(0)
    experts, d_model, d_ff = 4, 16, 32
    wi, wo = torch.randn(experts, d_ff, d_model, dtype=dtype), torch.randn(experts, d_model, d_ff, dtype=dtype)
    x, expert = torch.randn(7, d_model, dtype=dtype), torch.tensor([2, 0, 2, 3, 1, 1, 2])
    act = ACTIVATION_FUNCTIONS["gelu_new"]
    out = stacked_ffn(x, expert, wi, wo, act)
    for row, e in enumerate(expert.tolist()):
        torch.testing.assert_close(out[row:row + 1], expert_ffn(x[row:row + 1], wi[e], wo[e], act))


def test_a_layers_stacked_experts_are_its_weights_copied_in_place_one_by_one(checkpoint_factory, monkeypatch):
    """experts.held.stacked_experts, as a front on a GPU holds a layer (here on the CPU, in bfloat16): each expert's
    wi and wo in its place of the stack, cast; copied in one tensor at a time. Fails if the layer is stacked in host
    memory first (torch.stack: a second copy of a whole layer, 21 GB of switch-xxl-128's in bfloat16)."""
    from experts.checkpoint import SwitchCheckpoint
    from experts.held import stacked_experts
    from experts.spec import expert_tensor_names, sparse_layers

    path, _ = checkpoint_factory("stacked", num_experts=4)
    checkpoint = SwitchCheckpoint.open(path)
    layer = ("decoder", sparse_layers(checkpoint.config, "decoder")[-1])
    monkeypatch.setattr(torch, "stack", lambda *args, **kwargs: pytest.fail("stacked in host memory"))
    wi, wo = stacked_experts(checkpoint, layer, "cpu", torch.bfloat16)
    assert wi.shape[0] == wo.shape[0] == 4 and wi.dtype == wo.dtype == torch.bfloat16
    for e in range(4):
        weights = checkpoint.read(list(expert_tensor_names(*layer, e)))
        for stacked, name in zip((wi[e], wo[e]), expert_tensor_names(*layer, e), strict=True):
            assert torch.equal(stacked, weights[name].bfloat16())


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 2, 4, 0, 1], [1], [0, 9, 0]])
def test_grouped_experts_give_each_token_its_own_experts_output(counts):
    torch.manual_seed(0)
    weights = [(torch.randn(40, 16), torch.randn(16, 40)) for _ in counts]
    x = torch.randn(sum(counts), 16)
    out = grouped_ffn(x, counts, weights, F.relu)
    experts = [e for e, n in enumerate(counts) for _ in range(n)]
    for row, e in enumerate(experts):
        torch.testing.assert_close(out[row:row + 1], expert_ffn(x[row:row + 1], *weights[e], F.relu))


def test_the_callers_openmp_threads_are_left_as_they_were():
    """Each expert thread computes on one OpenMP thread; the caller's count, and the count that threads started
    later begin with, stay as they were."""
    before = torch.get_num_threads()
    threads = CoreThreads(2)
    try:
        assert torch.get_num_threads() == before
        assert threads.pool.submit(torch.get_num_threads).result() == 1
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [before]
    finally:
        threads.close()


def on_openmp_threads(fn, openmp: int = 1):
    """fn's result, computed on a thread of its own with one OpenMP thread (as a small decoding step runs), or
    `openmp`."""
    out = []

    def run() -> None:
        torch.set_num_threads(openmp)
        with torch.inference_mode():
            out.append(fn())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.parametrize("turned", [True, False])
def test_a_product_of_a_few_rows_runs_the_way_measured_faster(turned, monkeypatch):
    """Two to TRANSPOSED_MAX_ROWS rows go through torch.mm(weight, x.T) where that is the faster way, else like one
    row and more rows through F.linear; the result is F.linear's either way, in x's leading shape. A PackedWeight's
    products of fewer than PACKED_MIN_ROWS rows choose the same way, by the weight itself."""
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    monkeypatch.setattr(ffn, "MEASURED_MIN_BYTES", 0)
    monkeypatch.setattr(ffn, "transposed_is_faster", lambda x, w: turned)
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *args: (calls.append(args[1].shape[1]), mm(*args))[1])
    for w in (weight, pack(weight)):
        for rows in (1, 2, 5, TRANSPOSED_MAX_ROWS, TRANSPOSED_MAX_ROWS + 1):
            x = torch.randn(rows, 1, 64)
            out = linear(x, w)
            assert out.shape == (rows, 1, 96) and out.is_contiguous()
            assert torch.allclose(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert PACKED_MIN_ROWS[torch.float32] == 4  # so that of the packed weight's products, only 2 rows are few enough
    assert calls == ([2, 5, TRANSPOSED_MAX_ROWS, 2] if turned else [])


BF16_PACKED = pytest.mark.skipif(not packs(torch.bfloat16), reason="oneDNN packs no bfloat16 on this CPU")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16_PACKED)])
def test_products_of_several_rows_run_on_the_packed_copy(dtype):
    """A PackedWeight's products of PACKED_MIN_ROWS (for its dtype) to PACKED_MAX_ROWS rows run on its packed copy,
    fewer or more on the weight itself: told apart here by a copy packed from another weight. Either gives F.linear's
    result, in x's leading shape."""
    torch.manual_seed(0)
    weight, other = torch.randn(96, 64, dtype=dtype), torch.randn(96, 64, dtype=dtype)
    packed = pack(weight)
    assert isinstance(packed, PackedWeight) and packed.weight is weight and packed.shape == weight.shape
    swapped = PackedWeight(weight, pack(other).packed)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    least = PACKED_MIN_ROWS[dtype]
    for rows in sorted({1, max(least - 1, 1), least, 5, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 300}):
        x = torch.randn(rows, 1, 64, dtype=dtype)
        out = linear(x, packed)
        assert out.shape == (rows, 1, 96) and out.dtype == dtype
        assert torch.allclose(out.float(), F.linear(x, weight).float(), rtol=tolerance, atol=tolerance)
        used = other if least <= rows <= PACKED_MAX_ROWS else weight
        assert torch.allclose(linear(x, swapped).float(), F.linear(x, used).float(), rtol=tolerance, atol=tolerance)


def test_only_float_weights_on_the_cpu_are_packed():
    weight = torch.randn(96, 64)
    assert isinstance(pack(weight), PackedWeight)
    assert isinstance(pack(weight.bfloat16()), PackedWeight) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert pack(weight.half()).dtype == torch.float16 and not isinstance(pack(weight.half()), PackedWeight)
    quantized = int8.quantize(weight)
    assert pack(quantized) is quantized


def test_a_cpu_without_bfloat16_products_in_onednn_gets_no_packed_bfloat16(monkeypatch):
    """Where oneDNN computes no bfloat16 (CPUs without AVX-512 or AVX-NE-CONVERT), a bfloat16 weight stays as it is
    and its products are F.linear's; float32 weights are still packed. Fails if bfloat16 is packed there: oneDNN's
    packing raises, and a front serving bfloat16 fails to start."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    assert not packs(torch.bfloat16) and pack(weight) is weight and packs(torch.float32)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(linear(x, pack(weight)), F.linear(x, weight))


def test_the_faster_way_is_timed_per_shape_rows_and_threads_at_the_uses_due(monkeypatch):
    """Products of each weight shape, power of two of rows and count of OpenMP threads time both ways at the uses in
    TIMED_AT_USES, and the shortest times so far decide. Fails if the choice ignores the timings, times every use,
    keeps only the last timing, or if different shapes, rows or threads share one."""
    monkeypatch.setattr(ffn, "_transposed_timings", defaultdict(ffn._transposed_timings.default_factory))
    monkeypatch.setattr(ffn, "TIMED_AT_USES", (1, 3))
    answers = iter([[1.0, 2.0], [2.0, 1.0], [2.0, 1.0], [1.0, 2.0], [3.0, 1.5]])  # F.linear's, then weight @ x.T's
    timed = []

    def timing(by_rows, turned, repeats=3):
        timed.append(1)
        return next(answers)

    monkeypatch.setattr(ffn, "best_seconds", timing)
    small, large = torch.randn(96, 64), torch.randn(128, 64)

    def faster(rows: int, weight: torch.Tensor, openmp: int = 1) -> bool:
        return on_openmp_threads(lambda: transposed_is_faster(torch.randn(rows, 64), weight), openmp)

    assert not faster(3, small)  # timed: F.linear is faster
    assert not faster(4, small)  # rows 3 and 4 share a power of two: not timed at use 2
    assert len(timed) == 1
    assert faster(5, small)
    assert faster(5, large)
    assert not faster(5, small, openmp=2)
    assert len(timed) == 4 and len(ffn._transposed_timings) == 4
    assert not faster(4, small)  # use 3, timed again: 3.0 and 1.5, but F.linear's 1.0 before is shorter still
    assert len(timed) == 5 and ffn._transposed_timings[(96, 64, 4, 1)].best == [1.0, 1.5]


def test_best_seconds_times_each_way():
    calls = []

    def quick():
        calls.append("quick")

    def slow():
        calls.append("slow")
        threading.Event().wait(0.02)

    quick_s, slow_s = ffn.best_seconds(quick, slow, repeats=2)
    assert quick_s < 0.01 <= 0.02 <= slow_s
    assert calls == ["quick", "slow"] * 3  # one run each to warm up, then the runs that count, taking turns


def test_one_row_by_a_large_weight_on_one_openmp_thread_runs_on_every_core(expert_threads, monkeypatch):
    """One row: every part but one computed by another thread; the result is F.linear's. Several rows, a small
    weight, or a caller on several OpenMP threads stay on the caller's thread. Fails if linear_on_cores never
    splits, cuts the rows wrong, or splits what it should not."""
    torch.manual_seed(0)
    large = torch.randn(SPLIT_MIN_BYTES // (4 * 256) + 3, 256)  # float32, just over the threshold, rows odd
    small = torch.randn(64, 256)
    one_row, rows = torch.randn(1, 256), torch.randn(3, 256)
    submitted = []
    submit = expert_threads.pool.submit

    def counting_submit(*args):
        submitted.append(args)
        return submit(*args)

    monkeypatch.setattr(expert_threads.pool, "submit", counting_submit)
    assert torch.allclose(on_openmp_threads(lambda: linear_on_cores(one_row, large, expert_threads)),
                          F.linear(one_row, large), rtol=1e-5, atol=1e-5)
    assert len(submitted) == expert_threads.n - 1  # every part but the caller's own
    for x, weight in ((rows, large), (one_row, small), (rows, small)):
        assert torch.equal(on_openmp_threads(lambda x=x, weight=weight: linear_on_cores(x, weight, expert_threads)),
                           on_openmp_threads(lambda x=x, weight=weight: linear(x, weight)))
    assert torch.equal(on_openmp_threads(lambda: linear_on_cores(one_row, large, expert_threads), 2),
                       on_openmp_threads(lambda: linear(one_row, large), 2))  # MKL's rounding follows the threads
    assert len(submitted) == expert_threads.n - 1


def test_one_expert_alone_has_its_products_split(expert_threads, monkeypatch):
    """A decoding step's single token goes to one expert, whose products are split over the core threads."""
    monkeypatch.setattr("experts.ffn.SPLIT_MIN_BYTES", 0)
    torch.manual_seed(0)
    wi, wo = torch.randn(40, 16), torch.randn(16, 40)
    x = torch.randn(1, 16)
    names = set()
    submit = expert_threads.pool.submit

    def naming_submit(fn, *args):
        return submit(lambda: (names.add(threading.current_thread().name), fn(*args))[1])

    expert_threads.pool.submit = naming_submit
    try:
        out = on_openmp_threads(lambda: expert_ffn(x, wi, wo, F.relu, expert_threads))
    finally:
        expert_threads.pool.submit = submit
    assert torch.allclose(out, expert_ffn(x, wi, wo, F.relu), rtol=1e-5, atol=1e-6)
    assert names and all(name.startswith("switch-serve-cores") for name in names)


@pytest.mark.parametrize("pay", [True, False])
def test_the_process_core_threads_follow_the_count_asked_for_where_they_pay(pay, monkeypatch):
    """Started for two cores or more where parts_beat_openmp says so, timed at the uses due per count; none
    otherwise. Fails if the timing is skipped, repeated at every call, or its answer ignored."""
    timed = []
    core_threads(1)
    monkeypatch.setattr(ffn, "_parts_timings", defaultdict(ffn._parts_timings.default_factory))
    monkeypatch.setattr(ffn, "TIMED_AT_USES", (1, 3))
    monkeypatch.setattr(ffn, "openmp_and_parts_seconds",
                        lambda threads, dtype: (timed.append((threads.n, dtype)), [1.0, 1.0])[1])
    monkeypatch.setattr(ffn, "parts_beat_openmp", lambda timings: pay)
    try:
        two = core_threads(2)
        assert (two is not None and two.n == 2) == pay and core_threads() is two and core_threads(2) is two
        assert core_threads(1) is None and core_threads() is None
        assert (core_threads(2) is not None) == pay and (core_threads(3) is not None) == pay
        core_threads(2, torch.bfloat16)  # another dtype's weights: timed apart
        # The third call with 2 is timed again.
        assert timed == [(2, torch.float32), (2, torch.float32), (3, torch.float32), (2, torch.bfloat16)]
    finally:
        core_threads(1)


def test_parts_beat_openmp_by_a_tenth():
    timings = ffn.Timings(2)
    for seconds, pay in (([1.0, 0.95], False), ([2.0, 0.85], True), ([0.6, 1.0], False)):
        timings.add(seconds)  # the shortest of each so far: (1.0, 0.95), then (1.0, 0.85), then (0.6, 0.85)
        assert ffn.parts_beat_openmp(timings) == pay


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_openmp_and_parts_are_timed_on_the_callers_threads_in_the_dtype(expert_threads, dtype, monkeypatch):
    """Both ways run (a time each) on weights of the dtype asked for, as many bytes of them in each, and the caller
    keeps its OpenMP threads."""
    weights = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, weight: (weights.append(weight), linear(x, weight))[1])
    seconds, openmp = on_openmp_threads(
        lambda: (ffn.openmp_and_parts_seconds(expert_threads, dtype), torch.get_num_threads()), 2)
    assert len(seconds) == 2 and all(0 < s < 1 for s in seconds) and openmp == 2
    assert weights and {w.dtype for w in weights} == {dtype}
    probe = ffn.PROBE_WEIGHTS
    assert len({w.untyped_storage().data_ptr() for w in weights}) == probe[0] * torch.float32.itemsize // dtype.itemsize


def test_a_wo_of_another_dtype_gets_its_input_in_its_own_dtype():
    """As transformers' expert does before its `wo` (for a checkpoint that keeps `wo` in float32): the activation
    cast to wo's dtype, both for one expert and stacked. Fails if wo's product takes the activation as it is."""
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersDenseActDense

    torch.manual_seed(7)
    x, wi, wo = torch.randn(3, 8).bfloat16(), torch.randn(16, 8).bfloat16(), torch.randn(8, 16)
    theirs = SwitchTransformersDenseActDense(SwitchTransformersConfig(d_model=8, d_ff=16, dense_act_fn="relu")).eval()
    theirs.wi.weight.data, theirs.wo.weight.data = wi, wo
    with torch.no_grad():
        expected = theirs(x)
    assert expected.dtype == torch.float32 and torch.equal(ffn.expert_ffn(x, wi, wo, F.relu), expected)
    stacked = ffn.stacked_ffn(x, torch.zeros(3, dtype=torch.long), wi[None], wo[None], F.relu)
    assert stacked.dtype == torch.float32 and torch.allclose(stacked, expected, rtol=1e-6, atol=1e-6)
