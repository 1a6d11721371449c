"""Routed experts on the CUTLASS Hopper grouped GEMM (`cutlass_grouped_gemm.py`).

Align with 128-row blocks (Triton), gather token rows into the padded expert-major layout, run
gate/up and down as two CUTLASS grouped GEMMs, SwiGLU and the weighted scatter-add combine in
torch. The GEMM is the custom op `glmc::cutlass_grouped_mm`; its backward runs
`glmc::grouped_mm` / `glmc::grouped_mm_wgrad` on the same padded layout (padding rows are zero),
so training works through autograd. CUDA only; importing this module does not import cutlass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .grouped_mm import grouped_mm, grouped_mm_wgrad
from .moe_align import moe_align_triton

TILE_M = 128


@torch.library.custom_op("glmc::cutlass_grouped_mm", mutates_args=())
def cutlass_grouped_mm(a: Tensor, b: Tensor, tile_expert: Tensor, offs: Tensor) -> Tensor:
    """a [M, K] in 128-row expert tiles, b [E, N, K], tile_expert [M / 128] int32 (-1: unused),
    offs [E] int32 padded segment ends (for the backward) -> [M, N]; unused tiles are zero."""
    from .cutlass_grouped_gemm import grouped_gemm

    return grouped_gemm(a, b, tile_expert)


@cutlass_grouped_mm.register_fake
def _(a: Tensor, b: Tensor, tile_expert: Tensor, offs: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[1])


def _setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    a, b, _tiles, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx: Any, grad: Tensor) -> tuple:
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    needs = ctx.needs_input_grad
    da = grouped_mm(grad, b, offs) if needs[0] else None
    db = grouped_mm_wgrad(grad, a, offs) if needs[1] else None
    return da, db, None, None


cutlass_grouped_mm.register_autograd(_backward, setup_context=_setup)


def moe_experts_cutlass(x: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    t, hidden = x.shape
    top_k = ids.shape[1]
    n_pairs = t * top_k
    align = moe_align_triton(ids, gate_up.shape[0], TILE_M)
    pair = align.sorted_ids.long()
    valid = pair < n_pairs
    token = torch.where(valid, pair // top_k, 0)
    offs = align.offsets[1:]
    xs = x.index_select(0, token) * valid.unsqueeze(1).to(x.dtype)
    gu = cutlass_grouped_mm(xs, gate_up, align.block_expert, offs)
    gate, up = gu.chunk(2, dim=-1)
    y = cutlass_grouped_mm((F.silu(gate) * up).contiguous(), down, align.block_expert, offs)
    w = torch.where(valid, weights.reshape(-1).index_select(0, torch.where(valid, pair, 0)), 0.0)
    out = x.new_zeros(t, hidden, dtype=torch.float32)
    out = out.scatter_add(0, token.unsqueeze(1).expand(-1, hidden), y.float() * w.unsqueeze(1))
    return out.to(x.dtype)
