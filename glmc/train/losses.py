"""The losses GLM-4.5 trains with (DeepSeek-V3 formulas, reference/training-stack.md §1.3).

Every loss is a mean over this rank's tokens (or sequences); ranks hold equal token counts
(packed data, no padding), so the data-parallel gradient average equals the global-batch
gradient and one process reproduces a dp-rank run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits [B, S, V] against labels [B, S], in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def mtp_loss(mtp_logits: list[Tensor], labels: Tensor) -> Tensor:
    """Mean over MTP depths of their cross-entropy. Depth k's logits [B, S-k-1, V] at position
    t predict token t+k+2 of the input, which is labels[:, t+k+1]. Each depth is normalised by
    its own (shorter) token count, as Megatron does (§7 table)."""
    losses = [next_token_loss(lg, labels[:, k + 1 :]) for k, lg in enumerate(mtp_logits)]
    return torch.stack(losses).mean()


def sequence_balance_loss(stats: list[tuple[Tensor, Tensor]], top_k: int) -> Tensor:
    """Σ_layers mean_sequences Σ_i f_i P_i with f_i = E/(k T) · #{t: i in TopK(s_t)} (top-k of
    the unbiased scores, no gradient) and P_i = mean_t s_i,t / Σ_j s_j,t (scores normalised over
    all experts). `stats` holds (scores [B, S, E], ids [B, S, k]) per MoE layer."""
    total = torch.zeros((), dtype=torch.float32, device=stats[0][0].device)
    for scores, _ in stats:
        B, T, E = scores.shape
        with torch.no_grad():
            chosen = scores.topk(top_k, dim=-1).indices  # unbiased, unlike the routing itself
            hits = torch.zeros(B, E, device=scores.device).scatter_add_(
                1, chosen.flatten(1), torch.ones(B, T * top_k, device=scores.device)
            )
            f = hits * (E / (top_k * T))
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
        total = total + (f * p).sum(-1).mean()
    return total


@dataclass
class Losses:
    total: Tensor
    lm: Tensor
    mtp: Tensor | None
    balance: Tensor | None


def training_loss(
    logits: Tensor,
    mtp_logits: list[Tensor],
    stats: list[tuple[Tensor, Tensor]],
    labels: Tensor,
    *,
    mtp_weight: float,
    balance_weight: float,
    top_k: int,
) -> Losses:
    """CE + mtp_weight · MTP + balance_weight · sequence balance loss."""
    lm = next_token_loss(logits, labels)
    total = lm
    mtp = bal = None
    if mtp_logits:
        mtp = mtp_loss(mtp_logits, labels)
        if mtp_weight:
            total = total + mtp_weight * mtp
    if balance_weight and stats:
        bal = sequence_balance_loss(stats, top_k)
        total = total + balance_weight * bal
    return Losses(total, lm, mtp, bal)
