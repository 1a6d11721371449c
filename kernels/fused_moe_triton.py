# mypy: disable-error-code="no-untyped-def"
"""Triton kernels behind `glmc::fused_moe` / `glmc::fused_moe_backward`.

Rows live in the expert-major padded layout of `moe_align` (block_m rows per tile, one expert
per tile, sentinel rows masked). Accumulation is fp32. Under the interpreter bf16 operands are
upcast before `tl.dot` (the interpreter multiplies raw bf16 bits otherwise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import cdiv, interpreting
from ._triton_helpers import cast, dot


@triton.jit
def _up_kernel(
    x_ptr,
    w_ptr,
    h_ptr,
    gu_ptr,
    sorted_ptr,
    bexp_ptr,
    n_pairs,
    H,
    INTER,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wk,
    TOP_K: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERP: tl.constexpr,
    PREC: tl.constexpr,
):
    """h[r] = silu(x[tok(r)] @ gate[e].T) * (x[tok(r)] @ up[e].T): gather fused into the A load."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m)
    if e >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        valid = pair < n_pairs
        tok = (pair // TOP_K).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < INTER
        w_base = w_ptr + e.to(tl.int64) * stride_we
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < H
            a = tl.load(
                x_ptr + tok[:, None] * stride_xt + kk[None, :] * stride_xh,
                mask=valid[:, None] & km[None, :],
                other=0.0,
            )
            bmask = cm[None, :] & km[:, None]
            bg = tl.load(w_base + cols[None, :] * stride_wn + kk[:, None] * stride_wk, mask=bmask, other=0.0)
            bu = tl.load(
                w_base + (cols[None, :] + INTER) * stride_wn + kk[:, None] * stride_wk, mask=bmask, other=0.0
            )
            acc_g = dot(a, bg, acc_g, INTERP, PREC)
            acc_u = dot(a, bu, acc_u, INTERP, PREC)
        dtype = h_ptr.dtype.element_ty
        g = cast(acc_g, dtype, INTERP)
        u = cast(acc_u, dtype, INTERP)
        rr = rows.to(tl.int64)[:, None]
        if SAVE:
            tl.store(gu_ptr + rr * (2 * INTER) + cols[None, :], g, mask=cm[None, :])
            tl.store(gu_ptr + rr * (2 * INTER) + INTER + cols[None, :], u, mask=cm[None, :])
        gf = g.to(tl.float32)
        h = gf * tl.sigmoid(gf) * u.to(tl.float32)
        tl.store(h_ptr + rr * INTER + cols[None, :], cast(h, dtype, INTERP), mask=cm[None, :])


@triton.jit
def _down_scatter_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    sorted_ptr,
    bexp_ptr,
    wts_ptr,
    n_pairs,
    K,
    N,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    TOP_K: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERP: tl.constexpr,
    PREC: tl.constexpr,
):
    """out[tok(r)] += w[pair(r)] * (a[r] @ W[e].T): weight multiply and scatter-add in the epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m)
    if e >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        valid = pair < n_pairs
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < N
        w_base = w_ptr + e.to(tl.int64) * stride_we
        rr = rows.to(tl.int64)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < K
            a = tl.load(a_ptr + rr * stride_am + kk[None, :], mask=km[None, :], other=0.0)
            b = tl.load(
                w_base + cols[None, :] * stride_wn + kk[:, None] * stride_wk,
                mask=cm[None, :] & km[:, None],
                other=0.0,
            )
            acc = dot(a, b, acc, INTERP, PREC)
        if HAS_WEIGHT:
            acc = acc * tl.load(wts_ptr + pair, mask=valid, other=0.0)[:, None]
        tok = (pair // TOP_K).to(tl.int64)
        tl.atomic_add(out_ptr + tok[:, None] * N + cols[None, :], acc, mask=valid[:, None] & cm[None, :])


@triton.jit
def _up_backward_kernel(
    dy_ptr,
    w_ptr,
    gu_ptr,
    dgu_ptr,
    dwts_ptr,
    wts_ptr,
    sorted_ptr,
    bexp_ptr,
    n_pairs,
    H,
    INTER,
    stride_dyt,
    stride_we,
    stride_wn,
    stride_wk,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERP: tl.constexpr,
    PREC: tl.constexpr,
):
    """G = dy[tok(r)] @ down[e] (gathered); epilogue: d w[pair] += <h, G>, dh = w G, SwiGLU backward."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m)
    if e >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        valid = pair < n_pairs
        tok = (pair // TOP_K).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < INTER
        w_base = w_ptr + e.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < H
            a = tl.load(
                dy_ptr + tok[:, None] * stride_dyt + kk[None, :], mask=valid[:, None] & km[None, :], other=0.0
            )
            b = tl.load(
                w_base + cols[None, :] * stride_wn + kk[:, None] * stride_wk,
                mask=cm[None, :] & km[:, None],
                other=0.0,
            )
            acc = dot(a, b, acc, INTERP, PREC)
        dtype = gu_ptr.dtype.element_ty
        rr = rows.to(tl.int64)[:, None]
        g = tl.load(gu_ptr + rr * (2 * INTER) + cols[None, :], mask=cm[None, :], other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + rr * (2 * INTER) + INTER + cols[None, :], mask=cm[None, :], other=0.0).to(
            tl.float32
        )
        sg = tl.sigmoid(g)
        act = g * sg
        # The forward fed h rounded to the activation dtype into the down GEMM.
        h = cast(act * u, dtype, INTERP).to(tl.float32)
        tl.atomic_add(dwts_ptr + pair, tl.sum(h * acc, axis=1), mask=valid)
        dh = acc * tl.load(wts_ptr + pair, mask=valid, other=0.0)[:, None]
        dg = dh * u * sg * (1.0 + g * (1.0 - sg))
        du = dh * act
        tl.store(dgu_ptr + rr * (2 * INTER) + cols[None, :], cast(dg, dtype, INTERP), mask=cm[None, :])
        tl.store(
            dgu_ptr + rr * (2 * INTER) + INTER + cols[None, :], cast(du, dtype, INTERP), mask=cm[None, :]
        )


@triton.jit
def _wgrad_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    sorted_ptr,
    offsets_ptr,
    wts_ptr,
    n_pairs,
    NA,
    NB,
    INTER,
    stride_a,
    stride_b,
    stride_oe,
    stride_on,
    TOP_K: tl.constexpr,
    A_GATHER: tl.constexpr,
    A_SCALE: tl.constexpr,
    B_GATHER: tl.constexpr,
    B_SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERP: tl.constexpr,
    PREC: tl.constexpr,
):
    """out[e] = sum over expert e's rows r of A(r)^T B(r), [NA, NB]. A and B rows are either the
    sorted row itself or gathered from token rows; A may carry the routing weight, B may be the
    SwiGLU of stored pre-activations."""
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    ncols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = ncols < NA
    kcols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    km = kcols < NB
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows, mask=rows < end, other=n_pairs)
        valid = pair < n_pairs
        tok = (pair // TOP_K).to(tl.int64)
        rr = rows.to(tl.int64)
        ra = tok if A_GATHER else rr
        a = tl.load(
            a_ptr + ra[:, None] * stride_a + ncols[None, :], mask=valid[:, None] & nm[None, :], other=0.0
        )
        if A_SCALE:
            a = cast(
                a.to(tl.float32) * tl.load(wts_ptr + pair, mask=valid, other=0.0)[:, None], dtype, INTERP
            )
        rb = tok if B_GATHER else rr
        bmask = valid[:, None] & km[None, :]
        if B_SWIGLU:
            g = tl.load(b_ptr + rb[:, None] * stride_b + kcols[None, :], mask=bmask, other=0.0).to(tl.float32)
            u = tl.load(b_ptr + rb[:, None] * stride_b + INTER + kcols[None, :], mask=bmask, other=0.0).to(
                tl.float32
            )
            b = cast(g * tl.sigmoid(g) * u, dtype, INTERP)
        else:
            b = tl.load(b_ptr + rb[:, None] * stride_b + kcols[None, :], mask=bmask, other=0.0)
        acc = dot(tl.trans(a), b, acc, INTERP, PREC)
    optr = out_ptr + e.to(tl.int64) * stride_oe + ncols[:, None] * stride_on + kcols[None, :]
    tl.store(optr, cast(acc, dtype, INTERP), mask=nm[:, None] & km[None, :])


def _tiles(n_rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for the GEMMs."""
    if interpreting():
        return 64, 64, 1, 1
    return 64, 64, 4, 3


def _prec(dtype: torch.dtype) -> str:
    # fp32 models get fp32 products (torch's default matmul precision), not TF32.
    return "ieee" if dtype == torch.float32 or interpreting() else "tf32"


def moe_forward(
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    weights: Tensor,
    sorted_ids: Tensor,
    block_expert: Tensor,
    top_k: int,
    block_m: int,
    save_preact: bool,
) -> tuple[Tensor, Tensor]:
    t, hidden = x.shape
    inter = down.shape[2]
    capacity = sorted_ids.shape[0]
    n_pairs = t * top_k
    out32 = torch.zeros(t, hidden, device=x.device, dtype=torch.float32)
    preact = x.new_empty(capacity if save_preact else 0, 2 * inter)
    n_blocks = block_expert.shape[0]
    if n_blocks == 0 or t == 0:
        return out32.to(x.dtype), preact
    h = x.new_empty(capacity, inter)
    bn, bk, warps, stages = _tiles(capacity)
    interp = interpreting()
    prec = _prec(x.dtype)
    _up_kernel[(n_blocks, cdiv(inter, bn))](
        x, gate_up, h, preact, sorted_ids, block_expert, n_pairs, hidden, inter,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        TOP_K=top_k, SAVE=save_preact, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, INTERP=interp, PREC=prec,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _down_scatter_kernel[(n_blocks, cdiv(hidden, bn))](
        h, down, out32, sorted_ids, block_expert, weights.contiguous(), n_pairs, inter, hidden,
        h.stride(0), down.stride(0), down.stride(1), down.stride(2),
        TOP_K=top_k, HAS_WEIGHT=True, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, INTERP=interp, PREC=prec,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out32.to(x.dtype), preact


def moe_backward(
    grad: Tensor,
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    weights: Tensor,
    sorted_ids: Tensor,
    block_expert: Tensor,
    offsets: Tensor,
    preact: Tensor,
    top_k: int,
    block_m: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    t, hidden = x.shape
    n_exp, two_i, _ = gate_up.shape
    inter = two_i // 2
    capacity = sorted_ids.shape[0]
    n_pairs = t * top_k
    grad = grad.contiguous()
    x_c = x.contiguous()
    weights = weights.contiguous()
    dx32 = torch.zeros(t, hidden, device=x.device, dtype=torch.float32)
    dwts = torch.zeros(n_pairs, device=x.device, dtype=torch.float32)
    d_gate_up = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
    d_down = torch.empty_like(down, memory_format=torch.contiguous_format)
    n_blocks = block_expert.shape[0]
    if n_blocks == 0 or t == 0:
        d_gate_up.zero_()
        d_down.zero_()
        return dx32.to(x.dtype), d_gate_up, d_down, dwts.view(t, top_k)
    bn, bk, warps, stages = _tiles(capacity)
    interp = interpreting()
    prec = _prec(x.dtype)
    dgu = x.new_empty(capacity, two_i)
    # G = dy @ down[e] (down[e] is [H, I]: n runs over I, k over H).
    _up_backward_kernel[(n_blocks, cdiv(inter, bn))](
        grad, down, preact, dgu, dwts, weights, sorted_ids, block_expert, n_pairs, hidden, inter,
        grad.stride(0), down.stride(0), down.stride(2), down.stride(1),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, INTERP=interp, PREC=prec,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    # dx[tok] += dgu @ gate_up[e] (gate_up[e] is [2I, H]: n runs over H, k over 2I).
    _down_scatter_kernel[(n_blocks, cdiv(hidden, bn))](
        dgu, gate_up, dx32, sorted_ids, block_expert, weights, n_pairs, two_i, hidden,
        dgu.stride(0), gate_up.stride(0), gate_up.stride(2), gate_up.stride(1),
        TOP_K=top_k, HAS_WEIGHT=False, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, INTERP=interp, PREC=prec,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    wbm = 16 if interpreting() else 32
    # d gate_up[e] = dgu_e^T @ x[tok]
    _wgrad_kernel[(n_exp, cdiv(two_i, bn), cdiv(hidden, bk))](
        dgu, x_c, d_gate_up, sorted_ids, offsets, weights, n_pairs, two_i, hidden, inter,
        dgu.stride(0), x_c.stride(0), d_gate_up.stride(0), d_gate_up.stride(1),
        TOP_K=top_k, A_GATHER=False, A_SCALE=False, B_GATHER=True, B_SWIGLU=False,
        BLOCK_M=wbm, BLOCK_N=bn, BLOCK_K=bk, INTERP=interp, PREC=prec, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    # d down[e] = (w * dy[tok])^T @ h
    _wgrad_kernel[(n_exp, cdiv(hidden, bn), cdiv(inter, bk))](
        grad, preact, d_down, sorted_ids, offsets, weights, n_pairs, hidden, inter, inter,
        grad.stride(0), preact.stride(0), d_down.stride(0), d_down.stride(1),
        TOP_K=top_k, A_GATHER=True, A_SCALE=True, B_GATHER=False, B_SWIGLU=True,
        BLOCK_M=wbm, BLOCK_N=bn, BLOCK_K=bk, INTERP=interp, PREC=prec, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dx32.to(x.dtype), d_gate_up, d_down, dwts.view(t, top_k)
