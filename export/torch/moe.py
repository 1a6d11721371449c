"""MoE routing and expert compute for the torch target (plain torch; the kernel seam replaces these)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from glmc.kernels.grouped_mm import grouped_mm


def route(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[Tensor, Tensor]:
    """x [T, H] -> ids [T, k] int64, weights [T, k] fp32. Logits in fp32 as every runtime does."""
    scores = F.linear(x.float(), weight.float()).sigmoid()  # [T, E]
    choice = scores if bias is None else scores + bias
    if n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)
    ids = choice.topk(top_k, dim=-1).indices
    w = scores.gather(1, ids)  # unbiased scores: the bias only selects
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * routed_scaling_factor


def moe_experts(x: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for x [T, H]; no Python loop over experts."""
    T, k = ids.shape
    E = gate_up.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # expert-major order of the T*k (token, slot) pairs
    token = order // k
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[token]  # [T*k, H]
    gu = grouped_mm(xs, gate_up.transpose(1, 2), offs)  # [T*k, 2I]
    gate, up = gu.chunk(2, dim=-1)
    ys = grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs)  # [T*k, H]
    ys = ys * weights.reshape(-1)[order, None]
    out = torch.zeros(T, x.shape[1], dtype=ys.dtype, device=x.device).index_add(0, token, ys)
    return out.to(x.dtype)
