# mypy: disable-error-code="no-untyped-def"
"""Fused router kernel: logits GEMM (fp32), sigmoid, correction bias, group-limited top-k,
renormalise and scale, one program per block of tokens. Imported only when the Triton backend
runs (see `router.route_fused`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import cdiv, interpreting, next_pow2, route_launch_shape


@triton.jit
def _route_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    ids_ptr,
    wout_ptr,
    sel_ptr,
    T,
    H,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wh,
    scale,
    S: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    SP: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PREC: tl.constexpr,
):
    EP: tl.constexpr = GP * SP
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    # Slot p of the padded [GP, SP] score tile holds expert g*S + s (g = p // SP, s = p % SP).
    p = tl.arange(0, EP)
    g = p // SP
    s = p % SP
    valid = (g < G) & (s < S)
    e = g * S + s

    acc = tl.zeros([BLOCK_T, EP], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hm = hh < H
        xt = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * stride_xt + hh[None, :] * stride_xh,
            mask=rmask[:, None] & hm[None, :],
            other=0.0,
        ).to(tl.float32)
        wt = tl.load(
            w_ptr + e[None, :] * stride_we + hh[:, None] * stride_wh,
            mask=valid[None, :] & hm[:, None],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PREC)

    scores = tl.sigmoid(acc)
    choice = scores
    if HAS_BIAS:
        bias = tl.load(b_ptr + e, mask=valid, other=0.0).to(tl.float32)
        choice = choice + bias[None, :]
    neg_inf = float("-inf")
    choice = tl.where(valid[None, :], choice, neg_inf)

    if G > 1:
        c3 = tl.reshape(choice, (BLOCK_T, GP, SP))
        s_idx = tl.arange(0, SP)[None, None, :]
        best = tl.max(c3, axis=2)
        best_at = tl.argmax(c3, axis=2)
        if S > 1:
            second = tl.max(tl.where(s_idx == best_at[:, :, None], neg_inf, c3), axis=2)
            gscore = best + second
        else:
            gscore = best
        g_idx = tl.arange(0, GP)[None, :]
        gscore = tl.where(g_idx < G, gscore, neg_inf)
        keep = tl.zeros([BLOCK_T, GP], dtype=tl.int32)
        for _ in range(TOPK_GROUP):
            top = tl.argmax(gscore, axis=1)
            hit = g_idx == top[:, None]
            keep = tl.where(hit, 1, keep)
            gscore = tl.where(hit, neg_inf, gscore)
        c3 = tl.where(keep[:, :, None] != 0, c3, neg_inf)
        choice = tl.reshape(c3, (BLOCK_T, EP))

    slot = tl.arange(0, EP)[None, :]
    kcol = tl.arange(0, KP)[None, :]
    sel = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, KP], dtype=tl.int64)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in range(TOPK):
        top = tl.argmax(choice, axis=1)
        hit = slot == top[:, None]
        val = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        eid = (top // SP) * S + top % SP
        sel = tl.where(kcol == j, val[:, None], sel)
        ids = tl.where(kcol == j, eid[:, None].to(tl.int64), ids)
        total += val
        choice = tl.where(hit, neg_inf, choice)

    weights = sel
    if NORM:
        weights = weights / (total[:, None] + 1e-20)
    weights = weights * scale
    out = rows[:, None] * TOPK + kcol
    omask = rmask[:, None] & (kcol < TOPK)
    tl.store(ids_ptr + out, ids, mask=omask)
    tl.store(wout_ptr + out, weights, mask=omask)
    tl.store(sel_ptr + out, sel, mask=omask)


def launch_route(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[Tensor, Tensor, Tensor]:
    t, h = x.shape
    num_experts = weight.shape[0]
    ids = torch.empty(t, top_k, device=x.device, dtype=torch.int64)
    w = torch.empty(t, top_k, device=x.device, dtype=torch.float32)
    sel = torch.empty(t, top_k, device=x.device, dtype=torch.float32)
    if t == 0:
        return ids, w, sel
    gp, sp = route_launch_shape(num_experts, n_group)
    block_t = 16 if gp * sp > 128 else 32
    block_h = min(128 if interpreting() else 64, next_pow2(h, floor=16))
    _route_kernel[(cdiv(t, block_t),)](
        x,
        weight,
        bias if bias is not None else w,
        ids,
        w,
        sel,
        t,
        h,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        float(routed_scaling_factor),
        S=num_experts // n_group,
        G=n_group,
        GP=gp,
        SP=sp,
        TOPK=top_k,
        KP=next_pow2(top_k),
        TOPK_GROUP=topk_group,
        HAS_BIAS=bias is not None,
        NORM=norm_topk_prob,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        PREC="ieee",
    )
    return ids, w, sel
