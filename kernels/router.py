"""GLM-4.5 MoE router: fp32 logits, sigmoid scores, selection-only correction bias, group-limited
top-k, renormalisation and routed scaling (transformers `Glm4MoeTopkRouter` math).

`route_ref` is the plain-torch reference (differentiable through autograd, compiles fullgraph).
`glmc::route` is the fused Triton kernel as a custom op; its backward is plain torch on the
selected scores, so the weights are differentiable w.r.t. the input and the router weight while
the ids are not. The order of the ids within a row is by descending selection score (transformers
asks for `sorted=False`, which leaves it unspecified; the MoE output does not depend on it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_route_args(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts ({num_experts})")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must lie in 1..n_group={n_group}")
    if not 1 <= top_k <= topk_group * (num_experts // n_group):
        raise ValueError(
            f"top_k={top_k} must lie in 1..topk_group*experts_per_group="
            f"{topk_group * (num_experts // n_group)}"
        )


def route_ref(
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
    """Reference router: ids [T, top_k] int64 and weights [T, top_k] fp32."""
    num_experts = weight.shape[0]
    check_route_args(num_experts, top_k, n_group, topk_group)
    # fp32 logits even under bf16 autocast: selection margins are small (every runtime does this).
    with torch.autocast(x.device.type, enabled=False):
        logits = x.float() @ weight.float().t()
    scores = logits.sigmoid()
    choice = scores.detach() if bias is None else scores.detach() + bias.float()
    if n_group > 1:
        grouped = choice.view(-1, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1) if grouped.shape[-1] > 1 else grouped[..., 0]
        keep_idx = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, keep_idx, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, num_experts)
    ids = choice.topk(top_k, dim=-1, sorted=True).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * routed_scaling_factor


# --- fused kernel as a custom op -------------------------------------------------------------


@torch.library.custom_op("glmc::route", mutates_args=())
def route_fused(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (ids int64, weights fp32, selected sigmoid scores fp32, kept for backward)."""
    from .router_triton import launch_route

    check_route_args(weight.shape[0], top_k, n_group, topk_group)
    return launch_route(x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)


@route_fused.register_fake
def _(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[Tensor, Tensor, Tensor]:
    t = x.shape[0]
    return (
        x.new_empty(t, top_k, dtype=torch.int64),
        x.new_empty(t, top_k, dtype=torch.float32),
        x.new_empty(t, top_k, dtype=torch.float32),
    )


def _route_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, _bias, _k, _g, _tg, norm, scale = inputs
    ids, _w, sel = output
    ctx.save_for_backward(x, weight, ids, sel)
    ctx.norm = norm
    ctx.scale = scale


def _route_backward(
    ctx: Any, _g_ids: Tensor | None, g_w: Tensor | None, _g_sel: Tensor | None
) -> tuple[Tensor | None, Tensor | None, None, None, None, None, None, None]:
    x, weight, ids, sel = ctx.saved_tensors
    if g_w is None:
        return None, None, None, None, None, None, None, None
    g = g_w.float() * ctx.scale
    if ctx.norm:
        denom = sel.sum(-1, keepdim=True) + 1e-20
        g = g / denom - (g * sel).sum(-1, keepdim=True) / (denom * denom)
    # d sigmoid = s (1 - s); the bias only selects and gets no gradient.
    g_logit_sel = g * sel * (1 - sel)
    g_logits = torch.zeros(x.shape[0], weight.shape[0], device=x.device, dtype=torch.float32)
    g_logits = g_logits.scatter_add(1, ids, g_logit_sel)
    needs = ctx.needs_input_grad
    dx = (g_logits @ weight.float()).to(x.dtype) if needs[0] else None
    dw = (g_logits.t() @ x.float()).to(weight.dtype) if needs[1] else None
    return dx, dw, None, None, None, None, None, None


route_fused.register_autograd(_route_backward, setup_context=_route_setup)


def route_triton(
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
    ids, w, _ = route_fused(
        x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, float(routed_scaling_factor)
    )
    return ids, w
