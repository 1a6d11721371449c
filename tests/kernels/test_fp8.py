"""Block-scaled FP8: the Triton quantisers equal the references bit for bit (also under the
interpreter), scales stay finite, and the FP8 GEMMs match dequantise-then-matmul."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glmc.kernels import (
    dequantize_act_ref,
    dequantize_weight_ref,
    fp8_gemm_ref,
    fp8_grouped_gemm_ref,
    quantize_act_ref,
    quantize_weight_ref,
)
from glmc.kernels import fp8 as fp8_mod

E4M3_MAX = 448.0


def _bits_equal(a, b):
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def _awkward(rows, cols, seed, dtype=torch.float32):
    """Random values plus the cases that break naive scaling: an all-zero block, huge and tiny
    values, signed zeros, values that round up across a binade."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, cols)
    x[0, : min(cols, 128)] = 0.0
    if rows > 1:
        x[1, 0] = 3.0e38
        x[1, 1:4] = torch.tensor([-0.0, 1e-30, -(2.0**-10)])[: max(0, min(3, cols - 1))]
    if rows > 2:
        x[2, :] = 31.13  # rounds up into the next binade (32) once scaled
    if rows > 130:
        x[128:130, :] = 0.0  # a whole 128x128 weight block of zeros when cols <= 128
    return x.to(dtype)


@settings(deadline=None)  # examples: the profile in tests/conftest.py
@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_quantizers_are_bit_exact(rows, cols, dtype, seed, device):
    x = _awkward(rows, cols, seed, dtype)
    for ref_fn, fused in (
        (quantize_act_ref, fp8_mod.quantize_act_fused),
        (quantize_weight_ref, fp8_mod.quantize_weight_fused),
    ):
        q_ref, s_ref = ref_fn(x)
        q, s = fused(x.to(device))
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert torch.equal(s.cpu(), s_ref), ref_fn.__name__
        assert _bits_equal(q, q_ref), ref_fn.__name__


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (3, 129), (130, 257), (256, 128)])
def test_scales_finite_and_dequant_close(rows, cols):
    x = _awkward(rows, cols, 0)
    for quant, dequant, scale_shape in (
        (quantize_act_ref, dequantize_act_ref, (rows, -(-cols // 128))),
        (quantize_weight_ref, dequantize_weight_ref, (-(-rows // 128), -(-cols // 128))),
    ):
        q, s = quant(x)
        assert s.shape == scale_shape
        assert bool(torch.isfinite(s).all() and (s > 0).all())
        assert not bool(q.float().isnan().any())
        back = dequant(q, s)
        assert bool(torch.isfinite(back).all())
        # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 above the subnormal range, and an
        # absolute error <= 2^-10 * scale inside it.
        full = (
            s.repeat_interleave(128, -1) if s.shape[0] == rows else fp8_mod.expand_weight_scale(s, rows, cols)
        )
        full = full[:rows, :cols]
        err = (back - x).abs()
        assert bool((err <= x.abs() * 2.0**-4 + full * 2.0**-10 * 1.0001).all())
        zero_rows = (x == 0).all(-1)
        assert bool((back[zero_rows] == 0).all())


def _quantized_pair(m, n, k, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    return (*quantize_act_ref(a), *quantize_weight_ref(w))


@settings(deadline=None)  # examples: the profile in tests/conftest.py
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 200),
    k=st.integers(1, 300),
    out_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fp8_gemm_matches_dequantized_matmul(m, n, k, out_dtype, seed, device):
    a, a_s, w, w_s = _quantized_pair(m, n, k, seed, torch.float32)
    ref = fp8_gemm_ref(a, a_s, w, w_s, torch.float32)
    got = fp8_mod.fp8_gemm_fused(a.to(device), a_s.to(device), w.to(device), w_s.to(device), out_dtype)
    assert got.shape == (m, n) and got.dtype == out_dtype
    tol = 1e-5 if out_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float().cpu(), ref, atol=tol * ref.abs().max().item() + 1e-6, rtol=tol)


@settings(deadline=None)  # examples: the profile in tests/conftest.py
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    tail=st.integers(0, 5),
    n=st.sampled_from([8, 96, 130]),
    k=st.sampled_from([16, 128, 200]),
    seed=st.integers(0, 2**16),
)
def test_fp8_grouped_gemm_matches_reference(counts, tail, n, k, seed, device):
    g = torch.Generator().manual_seed(seed)
    m = sum(counts) + tail  # rows past offs[-1] must come out zero
    a, a_s = quantize_act_ref(torch.randn(m, k, generator=g))
    ws = [quantize_weight_ref(torch.randn(n, k, generator=g) / k**0.5) for _ in counts]
    w, w_s = torch.stack([q for q, _ in ws]), torch.stack([s for _, s in ws])
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    ref = fp8_grouped_gemm_ref(a, a_s, w, w_s, offs, torch.float32)
    args = [t.to(device) for t in (a, a_s, w, w_s, offs)]
    got = fp8_mod.fp8_grouped_gemm_fused(*args, torch.float32).cpu()
    atol = 1e-5 * (ref.abs().amax().item() + 1 if ref.numel() else 1)
    torch.testing.assert_close(got, ref, atol=atol, rtol=1e-5)
    assert bool((got[sum(counts) :] == 0).all())
    torch_path = fp8_mod.fp8_grouped_gemm_torch(a, a_s, w, w_s, offs, torch.float32)
    torch.testing.assert_close(torch_path, ref, atol=atol, rtol=1e-5)


def test_fp8_linear_close_to_full_precision():
    from glmc.kernels import fp8_linear, quantize_weight, use_kernels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 256, generator=g)
    w = torch.randn(192, 256, generator=g) / 16
    with use_kernels("torch"):
        q, s = quantize_weight(w)
        y = fp8_linear(x, q, s)
    want = x @ w.t()
    assert y.shape == (2, 5, 192)
    assert ((y - want).norm() / want.norm()).item() < 0.06  # two e4m3 roundings
