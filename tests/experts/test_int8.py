"""Weight-only int8: the quantization's error bound, and both CPU kernels against the dequantized weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from experts import int8
from experts.ffn import grouped_ffn
from experts.spec import SwitchConfig, expert_bytes


def test_quantization_is_within_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    w[5] = 0.0  # an all-zero row must not divide by zero
    q = int8.quantize(w)
    assert q.q.dtype == torch.int8 and q.scale.dtype == torch.float32 and q.scale.shape == (48,)
    assert int(q.q.abs().max()) == 127  # every nonzero row spans the range
    error = (q.dequantized(torch.float32) - w).abs()
    assert bool((error <= q.scale[:, None] / 2 + 1e-12).all())
    assert bool((q.dequantized(torch.float32)[5] == 0).all())
    assert q.nbytes == 48 * 32 + 48 * 4


@pytest.mark.parametrize("tokens", [1, 7, int8.PACKED_MAX_TOKENS, int8.PACKED_MAX_TOKENS + 1, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_equals_the_dequantized_weights(tokens, dtype):
    """Both CPU paths (the packed kernel for few tokens, float32's matmul for many) compute x @ dequantized(w).T
    with the activations in bfloat16, so within bfloat16's rounding."""
    torch.manual_seed(1)
    w, x = torch.randn(96, 64), torch.randn(tokens, 64).to(dtype)
    q = int8.quantize(w)
    out = int8.linear(x, q)
    reference = F.linear(x.float(), q.dequantized(torch.float32))
    assert out.dtype == dtype and out.shape == (tokens, 96)
    assert torch.allclose(out.float(), reference, rtol=2e-2, atol=2e-2 * float(reference.abs().mean()))
    assert not torch.allclose(reference, F.linear(x.float(), w), rtol=1e-6, atol=0)  # quantization did change w


def test_a_tokens_output_does_not_depend_on_how_many_share_its_expert():
    """A token alone (the packed kernel) and among more than PACKED_MAX_TOKENS (float32's matmul) gets the same
    output but for the order of float32's sums: a request's tokens must not change with the load. Fails if the two
    paths round differently (e.g. the activations to bfloat16 in one only)."""
    torch.manual_seed(5)
    q = int8.quantize(0.03 * torch.randn(3072, 768))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(int8.PACKED_MAX_TOKENS + 8, 768).to(dtype)
        alone = torch.cat([int8.linear(row[None], q) for row in x])
        together = int8.linear(x, q)
        assert float((alone == together).float().mean()) > 0.999, dtype
        # at most a step of bfloat16, or of the sums' own order where they cancel to near zero
        assert torch.allclose(alone.float(), together.float(), rtol=2 ** -6, atol=1e-4), dtype


@pytest.mark.parametrize("features", [768, 760])
def test_float16_activations_do_not_overflow(features):
    """At a Switch expert's shape, with its weights' small magnitudes, the product by the int8 values before their
    scales is ~1/scale times the output, beyond float16's range (760 features: not the packed kernel's, so the
    weights are dequantized). Fails if float16 takes that path."""
    torch.manual_seed(4)
    q = int8.quantize(0.02 * torch.randn(3072, features))
    x = (30 * torch.randn(int8.PACKED_MAX_TOKENS + 32, features)).to(torch.float16)
    out = int8.linear(x, q)
    reference = F.linear(x.float(), q.dequantized(torch.float32))
    assert out.dtype == torch.float16 and bool(out.isfinite().all())
    assert torch.allclose(out.float(), reference, rtol=1e-2, atol=1e-2 * float(reference.abs().mean()))


@pytest.mark.parametrize("features", [40, 72])
def test_input_features_the_packed_kernel_cannot_take_are_dequantized(features, monkeypatch):
    """On an AVX-512 CPU, torch's packed kernel crashes the process for these lengths: they must not reach it."""
    calls = []
    packed = torch._weight_int8pack_mm

    def checked(x, *args):
        calls.append(tuple(x.shape))
        assert x.shape[-1] % 16 == 0, "this would crash the process on an AVX-512 CPU"
        return packed(x, *args)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", checked)
    torch.manual_seed(3)
    q = int8.quantize(torch.randn(24, features))
    x = torch.randn(4, features)
    assert torch.allclose(int8.linear(x, q), F.linear(x, q.dequantized(torch.float32)), rtol=1e-5, atol=1e-5)
    int8.linear(torch.randn(4, 64), int8.quantize(torch.randn(24, 64)))
    assert calls == [(4, 64)]


def test_grouped_ffn_with_int8_weights_matches_the_dequantized_experts():
    torch.manual_seed(2)
    weights = [(torch.randn(40, 16), torch.randn(16, 40)) for _ in range(3)]
    x, counts = torch.randn(9, 16), [4, 0, 5]
    quantized = [(int8.quantize(wi), int8.quantize(wo)) for wi, wo in weights]
    dequantized = [(wi.dequantized(torch.float32), wo.dequantized(torch.float32)) for wi, wo in quantized]
    out = grouped_ffn(x, counts, quantized, F.relu)
    reference = grouped_ffn(x, counts, dequantized, F.relu)
    assert torch.allclose(out, reference, rtol=2e-2, atol=2e-2 * float(reference.abs().mean()))


@pytest.mark.parametrize("features", [12, 2 * int8.PACKED_FEATURES_MULTIPLE], ids=["unpacked", "packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_ffn_with_int8_weights_under_half_precision_activations(dtype, features):
    """A bfloat16 or float16 front's activations: the experts' output in that dtype, near the dequantized experts'
    (computed in float32) and nearer them than the unquantized weights'. Fails if int8 weights are computed
    unquantized, or their output comes back in float32."""
    torch.manual_seed(2)
    weights = [(torch.randn(2 * features, features), torch.randn(features, 2 * features)) for _ in range(3)]
    x, counts = torch.randn(9, features).to(dtype), [4, 0, 5]
    quantized = [(int8.quantize(wi), int8.quantize(wo)) for wi, wo in weights]
    dequantized = [(wi.dequantized(torch.float32), wo.dequantized(torch.float32)) for wi, wo in quantized]
    out = grouped_ffn(x, counts, quantized, F.relu)
    reference = grouped_ffn(x.float(), counts, dequantized, F.relu)
    unquantized = grouped_ffn(x.float(), counts, weights, F.relu)
    assert out.dtype == dtype
    error = float((out.float() - reference).abs().mean())
    assert error < 2e-2 * float(reference.abs().mean())
    assert 2 * error < float((out.float() - unquantized).abs().mean())


def test_int8_experts_take_a_quarter_of_float32_and_about_half_of_bfloat16():
    config = SwitchConfig(d_model=768, d_ff=3072)
    assert expert_bytes(config, "int8") / expert_bytes(config, "fp32") < 0.26
    assert expert_bytes(config, "int8") / expert_bytes(config, "bf16") < 0.51


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_on_cuda_equals_the_dequantized_weights(tokens, dtype):
    torch.manual_seed(3)
    q = int8.quantize(torch.randn(96, 64).cuda())
    x = torch.randn(tokens, 64, device="cuda").to(dtype)
    out = int8.linear(x, q)
    reference = F.linear(x.float(), q.dequantized(torch.float32))
    assert out.dtype == dtype and out.device.type == "cuda"
    assert torch.allclose(out.float(), reference, rtol=2e-2, atol=2e-2 * float(reference.abs().mean()))


def test_rows_of_zeros_or_of_subnormals_keep_a_positive_scale():
    """An output row of zeros has no largest magnitude to scale by, and one of subnormal weights a scale that
    underflows to zero: the scale is kept above zero, so that quantizing divides by it to zeros (not NaN, whose int8
    conversion is undefined, nor the ends of the range), within half a step, and both kernels give finite outputs.
    Fails if a scale can be zero."""
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    w[3] = 0.0
    w[5] = 1e-45  # float32's smallest subnormal
    q = int8.quantize(w)
    assert bool((q.scale > 0).all()) and bool(q.scale.isfinite().all())
    assert bool((q.q[3] == 0).all()) and bool((q.q[5] == 0).all())
    assert bool(((q.dequantized(torch.float32) - w).abs() <= q.scale[:, None] / 2).all())
    for tokens in (1, int8.PACKED_MAX_TOKENS + 1):
        assert bool(int8.linear(torch.randn(tokens, 64), q).isfinite().all())


def test_an_int8_expert_holds_its_int8_weights_and_a_float32_scale_per_output_channel():
    """What the planner counts an int8 expert as: exactly its int8 weights and the scales of wi's and wo's output
    channels. Fails if either's scales go uncounted (the plan would over-fill a GPU)."""
    config = SwitchConfig(d_model=768, d_ff=3072)
    wi, wo = int8.quantize(torch.zeros(3072, 768)), int8.quantize(torch.zeros(768, 3072))
    assert expert_bytes(config, "int8") == wi.nbytes + wo.nbytes == 2 * 768 * 3072 + 4 * (3072 + 768)


def test_dequantized_weights_are_the_float32_product_in_the_dtype_asked():
    """Scaled in float32, then cast once (CUDA's and float16's path): fails if the product is taken in the target
    dtype, which rounds the int8 values' products twice."""
    torch.manual_seed(6)
    q = int8.quantize(torch.randn(16, 32))
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(q.dequantized(dtype), (q.q.float() * q.scale[:, None]).to(dtype))
