# mypy: disable-error-code="no-untyped-def"
"""Triton kernels behind the `glmc::fp8_*` custom ops (formats in fp8.py).

The fp32 -> E4M3 conversion is done on the bits (round to nearest even, subnormals on an integer
grid, the sign copied, -0 kept) and stored as bytes: the interpreter's own cast drops the carry
when the mantissa rounds over (31.13 -> 16 instead of 32, triton#8322) and loses the sign of
zero, so doing it by hand makes CPU tests bit-exact against torch's cast, and the GPU runs the
same code. Division
uses `div_rn` (IEEE), as torch does, so the scales and quotients match too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import AMAX_EPS, BLOCK, FP8, FP8_MAX, cdiv, interpreting, next_pow2
from ._triton_helpers import cast, dot

# Kernels may read only constexpr globals (the interpreter does not enforce this; the compiler does).
_EPS = tl.constexpr(AMAX_EPS)
_MAX = tl.constexpr(FP8_MAX)
_F32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _scale_inv(amax):
    return tl.div_rn(tl.minimum(tl.maximum(amax, _EPS), _F32_MAX), _MAX)


@triton.jit
def _e4m3_bits(y):
    """The E4M3 byte nearest (ties to even) to fp32 y, which is already clamped to +-448."""
    a = tl.abs(y)
    bits = a.to(tl.uint32, bitcast=True)
    # Normal range: keep 3 mantissa bits; a carry into the exponent is just the integer carry.
    rb = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20
    normal = ((rb >> 3) - 120) << 3 | (rb & 7)
    # Subnormal range (< 2^-6): multiples of 2^-9; a * 512 < 8 is exact, round it as an integer.
    v = a * 512.0
    fl = v.to(tl.int32)
    frac = v - fl.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((fl & 1) == 1))
    sub = (fl + up.to(tl.int32)).to(tl.uint32)
    mag = tl.where(a < 0.015625, sub, normal)
    sign = (y.to(tl.uint32, bitcast=True) >> 31) << 7
    return (mag | sign).to(tl.uint8)


@triton.jit
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, KB, BLOCK_M: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = kb * BK + tl.arange(0, BK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _scale_inv(tl.max(tl.abs(x), axis=1))
    y = tl.minimum(tl.maximum(tl.div_rn(x, s[:, None]), -_MAX), _MAX)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], _e4m3_bits(y), mask=mask)
    tl.store(s_ptr + rows * KB + kb, s, mask=rows < M)


@triton.jit
def _quant_weight_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_wn, KB, BN: tl.constexpr, BK: tl.constexpr):
    nb = tl.program_id(0)
    kb = tl.program_id(1)
    rows = (nb * BN + tl.arange(0, BN)).to(tl.int64)
    cols = kb * BK + tl.arange(0, BK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _scale_inv(tl.max(tl.max(tl.abs(w), axis=1), axis=0))
    y = tl.minimum(tl.maximum(tl.div_rn(w, s), -_MAX), _MAX)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], _e4m3_bits(y), mask=mask)
    tl.store(s_ptr + nb * KB + kb, s)


@triton.jit
def _fp8_tile(
    a_ptr, as_ptr, b_ptr, bs_ptr, rows, rmask, cols, cmask, nb, K, KB, stride_am, stride_asm, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, KB):
        kk = kb * BK + tl.arange(0, BK)
        km = kk < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + cols[:, None] * stride_bn + kk[None, :], mask=cmask[:, None] & km[None, :], other=0.0
        )
        part = dot(a, tl.trans(b), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), INTERP, "ieee")
        sa = tl.load(as_ptr + rows * stride_asm + kb, mask=rmask, other=0.0)
        sb = tl.load(bs_ptr + nb * KB + kb)
        acc += part * sa[:, None] * sb
    return acc


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, KB, stride_am, stride_asm, stride_bn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    nb = (pid_n * BLOCK_N) // BK
    acc = _fp8_tile(
        a_ptr, as_ptr, b_ptr, bs_ptr, rows, rmask, cols, cmask, nb, K, KB, stride_am, stride_asm, stride_bn,
        BLOCK_M, BLOCK_N, BK, INTERP,
    )  # fmt: skip
    out = cast(acc, c_ptr.dtype.element_ty, INTERP)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], out, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _fp8_grouped_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offs_ptr, E, N, K, KB, NB, stride_am, stride_asm, stride_be, stride_bn,
    stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, EP: tl.constexpr,
    INTERP: tl.constexpr,
):  # fmt: skip
    """Tile schedule from offs on the device: group e owns ceil(count_e / BLOCK_M) row tiles."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.arange(0, EP)
    gm = g < E
    ends = tl.load(offs_ptr + g, mask=gm, other=0)
    starts = tl.load(offs_ptr + g - 1, mask=gm & (g > 0), other=0)
    tiles = tl.where(gm, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_end = tl.cumsum(tiles, axis=0)
    if pid_m < tl.sum(tiles, axis=0):
        e = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
        here = g == e
        first_tile = tl.sum(tl.where(here, tile_end - tiles, 0), axis=0)
        row0 = tl.sum(tl.where(here, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
        row_end = tl.sum(tl.where(here, ends, 0), axis=0)
        rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < row_end
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        nb = (pid_n * BLOCK_N) // BK
        e64 = e.to(tl.int64)
        acc = _fp8_tile(
            a_ptr, as_ptr, b_ptr + e64 * stride_be, bs_ptr + e64 * NB * KB, rows, rmask, cols, cmask, nb, K, KB,
            stride_am, stride_asm, stride_bn, BLOCK_M, BLOCK_N, BK, INTERP,
        )  # fmt: skip
        out = cast(acc, c_ptr.dtype.element_ty, INTERP)
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], out, mask=rmask[:, None] & cmask[None, :])


def launch_quantize_act(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.contiguous() if x.stride(-1) != 1 else x
    m, k = x.shape
    kb = cdiv(k, BLOCK)
    q = torch.empty(m, k, device=x.device, dtype=FP8)
    s = torch.empty(m, kb, device=x.device, dtype=torch.float32)
    if m and k:
        bm = 32 if interpreting() else 16
        _quant_act_kernel[(cdiv(m, bm), kb)](
            x, q.view(torch.uint8), s, m, k, x.stride(0), kb, BLOCK_M=bm, BK=BLOCK
        )
    return q, s


def launch_quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    w = w.contiguous() if w.stride(-1) != 1 else w
    n, k = w.shape
    nb, kb = cdiv(n, BLOCK), cdiv(k, BLOCK)
    q = torch.empty(n, k, device=w.device, dtype=FP8)
    s = torch.empty(nb, kb, device=w.device, dtype=torch.float32)
    if n and k:
        _quant_weight_kernel[(nb, kb)](w, q.view(torch.uint8), s, n, k, w.stride(0), kb, BN=BLOCK, BK=BLOCK)
    return q, s


def _gemm_tiles(m: int) -> tuple[int, int, int, int]:
    if interpreting():
        return 32, 64, 1, 1
    return (64 if m > 32 else 16), 128, 4, 3


def _check(a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor) -> None:
    if a.dtype != FP8 or w.dtype != FP8:
        raise TypeError(f"fp8 GEMM wants float8_e4m3fn operands, got {a.dtype} and {w.dtype}")
    if a.shape[-1] != w.shape[-1]:
        raise ValueError(f"contraction sizes differ: a {tuple(a.shape)}, w {tuple(w.shape)}")
    if a_s.shape != (a.shape[0], cdiv(a.shape[1], BLOCK)):
        raise ValueError(f"activation scale shape {tuple(a_s.shape)} does not match {tuple(a.shape)}")
    if w_s.shape[-2:] != (cdiv(w.shape[-2], BLOCK), cdiv(w.shape[-1], BLOCK)):
        raise ValueError(f"weight scale shape {tuple(w_s.shape)} does not match {tuple(w.shape)}")


def launch_fp8_gemm(a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, out_dtype: torch.dtype) -> Tensor:
    _check(a, a_s, w, w_s)
    a, w, a_s, w_s = a.contiguous(), w.contiguous(), a_s.contiguous(), w_s.contiguous()
    m, k = a.shape
    n = w.shape[0]
    c = torch.empty(m, n, device=a.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    bm, bn, warps, stages = _gemm_tiles(m)
    _fp8_gemm_kernel[(cdiv(m, bm), cdiv(n, bn))](
        a, a_s, w, w_s, c, m, n, k, cdiv(k, BLOCK), a.stride(0), a_s.stride(0), w.stride(0), c.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BK=BLOCK, INTERP=interpreting(), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return c


def launch_fp8_grouped_gemm(
    a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, offs: Tensor, out_dtype: torch.dtype
) -> Tensor:
    _check(a, a_s, w, w_s)
    a, w, a_s, w_s, offs = (
        a.contiguous(),
        w.contiguous(),
        a_s.contiguous(),
        w_s.contiguous(),
        offs.contiguous(),
    )
    m, k = a.shape
    n_groups, n, _ = w.shape
    c = torch.zeros(m, n, device=a.device, dtype=out_dtype)
    if m == 0 or n == 0 or k == 0 or n_groups == 0:
        return c
    bm, bn, warps, stages = _gemm_tiles(cdiv(m, n_groups))
    kb, nb = cdiv(k, BLOCK), cdiv(n, BLOCK)
    _fp8_grouped_kernel[(cdiv(m, bm) + n_groups, cdiv(n, bn))](
        a, a_s, w, w_s, c, offs, n_groups, n, k, kb, nb, a.stride(0), a_s.stride(0), w.stride(0), w.stride(1),
        c.stride(0), BLOCK_M=bm, BLOCK_N=bn, BK=BLOCK, EP=next_pow2(n_groups, floor=16),
        INTERP=interpreting(), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return c
