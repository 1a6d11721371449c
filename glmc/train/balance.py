"""Loss-free load balancing (DeepSeek-V3 §2.1.2, GLM-4.5 §2.4): once per optimizer step,
b_i += rate · sign(mean(n) − n_i) per MoE layer, where n are the tokens routed to each expert
this step, summed over every data-parallel rank (one all-reduce of an [L, E] tensor).

Choices where the stacks differ (reference/training-stack.md §7): the update runs once per
optimizer step after the gradients are synchronised (torchtitan, DeepSeek); no re-centring of
the update (Megatron and the papers' formula; torchtitan subtracts its mean); counts come from
the routers' own `tokens_per_expert` buffers, which count training forwards with grad enabled,
and activation-checkpoint recompute runs inside `no_token_counting`, so no token counts twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from glmc.export.torch.model import Router


def routers(model: nn.Module) -> list[Router]:
    """Every router in module order: trunk MoE layers first, then the MTP layers."""
    return [m for m in model.modules() if isinstance(m, Router)]


@contextmanager
def no_token_counting(rs: list[Router]) -> Iterator[None]:
    """Routers run without counting (activation-checkpoint recompute, evaluation)."""
    old = [r.count_tokens for r in rs]
    for r in rs:
        r.count_tokens = False
    try:
        yield
    finally:
        for r, o in zip(rs, old, strict=True):
            r.count_tokens = o


@torch.no_grad()
def global_counts(rs: list[Router], group: dist.ProcessGroup | None = None, reduce: bool = True) -> Tensor:
    """Tokens per expert [L, E] this step, summed over all data-parallel ranks (`group`; None: the
    world); zeroes the buffers. `reduce=False`: this rank's counts are already global (dp = 1)."""
    counts = torch.stack([r.tokens_per_expert for r in rs])
    if reduce and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    for r in rs:
        r.tokens_per_expert.zero_()
    return counts


@torch.no_grad()
def update_bias(rs: list[Router], counts: Tensor, rate: float) -> None:
    """b += rate · sign(mean − n) per layer (identical on every rank: the counts are global)."""
    if rate == 0:
        return
    for r, n in zip(rs, counts, strict=True):
        if r.e_score_correction_bias is not None:
            r.e_score_correction_bias += rate * torch.sign(n.mean() - n)


def imbalance(counts: Tensor) -> list[float]:
    """Per-layer max/mean expert load (1.0 is perfectly balanced)."""
    mean = counts.mean(-1).clamp(min=1e-9)
    return (counts.max(-1).values / mean).tolist()
