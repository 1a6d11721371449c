"""Routed experts: out[t] = sum_j w[t, j] * down[e] @ (silu(gate) * up), (gate | up) = gate_up[e] @ x[t],
e = ids[t, j]. Weights: gate_up [E, 2I, H] (gate rows first), down [E, H, I].

- `moe_experts_ref`: plain torch, one expert at a time (transformers `Glm4MoeExperts` math).
- `moe_experts_torch`: counting-sort align + `glmc::grouped_mm` (gate and up in one GEMM) +
  scatter_add combine in fp32; no Python loop over experts, no host sync, compiles fullgraph,
  differentiable through autograd.
- `glmc::fused_moe` (Triton): the gather of token rows is fused into the gate/up GEMM, whose
  epilogue applies SwiGLU; the routing-weight multiply and the scatter-add into the output are
  fused into the down GEMM's epilogue. `glmc::fused_moe_backward` holds the matching backward
  kernels (dX scatter, dW over gathered rows, routing-weight gradient in an epilogue).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import interpreting
from .grouped_mm import grouped_mm
from .moe_align import moe_align_torch, moe_align_triton


def moe_experts_ref(x: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    """Reference: loop over experts, index_add in x's dtype (as transformers does)."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(ids == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def moe_experts_torch(x: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    """Grouped-GEMM path built from `glmc::grouped_mm`; combine accumulates in fp32."""
    t, hidden = x.shape
    top_k = ids.shape[1]
    align = moe_align_torch(ids, gate_up.shape[0], block_m=1)
    pair = align.sorted_ids.long()
    token = pair // top_k
    offs = align.offsets[1:]
    gu = grouped_mm(x.index_select(0, token), gate_up.transpose(1, 2), offs)
    gate, up = gu.chunk(2, dim=-1)
    y = grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs)
    y = y.float() * weights.reshape(-1).index_select(0, pair).unsqueeze(1)
    # scatter_add, not index_add: AOTInductor's bf16 index_add fallback fails at run time.
    out = x.new_zeros(t, hidden, dtype=torch.float32)
    out = out.scatter_add(0, token.unsqueeze(1).expand(-1, hidden), y)
    return out.to(x.dtype)


# --- Triton fused path ---------------------------------------------------------------------------


def pick_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per GEMM tile: small when experts see few tokens (decode), so padding stays cheap."""
    if interpreting():
        return 16
    per_expert = num_pairs / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


@torch.library.custom_op("glmc::fused_moe", mutates_args=())
def fused_moe(
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    weights: Tensor,
    sorted_ids: Tensor,
    block_expert: Tensor,
    offsets: Tensor,
    top_k: int,
    block_m: int,
    save_preact: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out [T, H], gate/up pre-activations [capacity, 2I] or an empty tensor)."""
    from .fused_moe_triton import moe_forward

    return moe_forward(x, gate_up, down, weights, sorted_ids, block_expert, top_k, block_m, save_preact)


@fused_moe.register_fake
def _(
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    weights: Tensor,
    sorted_ids: Tensor,
    block_expert: Tensor,
    offsets: Tensor,
    top_k: int,
    block_m: int,
    save_preact: bool,
) -> tuple[Tensor, Tensor]:
    rows = sorted_ids.shape[0] if save_preact else 0
    return x.new_empty(x.shape), x.new_empty(rows, gate_up.shape[1])


@torch.library.custom_op("glmc::fused_moe_backward", mutates_args=())
def fused_moe_backward(
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
    """Returns (dx, d gate_up, d down, d weights)."""
    from .fused_moe_triton import moe_backward

    return moe_backward(
        grad, x, gate_up, down, weights, sorted_ids, block_expert, offsets, preact, top_k, block_m
    )


@fused_moe_backward.register_fake
def _(
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
    return (
        x.new_empty(x.shape),
        gate_up.new_empty(gate_up.shape),
        down.new_empty(down.shape),
        weights.new_empty(weights.shape),
    )


def _fused_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, gate_up, down, weights, sorted_ids, block_expert, offsets, top_k, block_m, _save = inputs
    ctx.save_for_backward(x, gate_up, down, weights, sorted_ids, block_expert, offsets, output[1])
    ctx.top_k = top_k
    ctx.block_m = block_m


def _fused_backward(ctx: Any, grad: Tensor | None, _g_preact: Tensor | None) -> tuple:
    x, gate_up, down, weights, sorted_ids, block_expert, offsets, preact = ctx.saved_tensors
    if grad is None:
        return (None,) * 10
    if preact.shape[0] != sorted_ids.shape[0]:
        raise RuntimeError(
            "glmc::fused_moe ran with save_preact=False; its backward needs the pre-activations"
        )
    dx, dgu, dd, dw = fused_moe_backward(
        grad.contiguous(),
        x,
        gate_up,
        down,
        weights,
        sorted_ids,
        block_expert,
        offsets,
        preact,
        ctx.top_k,
        ctx.block_m,
    )
    return dx, dgu, dd, dw, None, None, None, None, None, None


fused_moe.register_autograd(_fused_backward, setup_context=_fused_setup)


def moe_experts_triton(
    x: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, weights: Tensor, block_m: int | None = None
) -> Tensor:
    bm = block_m if block_m is not None else pick_block_m(ids.numel(), gate_up.shape[0])
    align = moe_align_triton(ids, gate_up.shape[0], bm)
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up, down, weights))
    out, _ = fused_moe(
        x,
        gate_up,
        down,
        weights.float(),
        align.sorted_ids,
        align.block_expert,
        align.offsets,
        ids.shape[1],
        bm,
        train,
    )
    return out
