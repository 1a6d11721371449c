"""The op set. One enum: every node in a graph is one of these."""

from __future__ import annotations

from enum import Enum


class Op(Enum):
    INPUT = "input"  # a graph input (token ids); attrs: name
    EMBED = "embed"  # token embedding lookup; params: weight [V, H]
    RMSNORM = "rmsnorm"  # w * x / sqrt(mean(x^2) + eps); params: weight [H]
    ATTENTION = "attention"  # GQA + partial RoPE + optional QK-norm; q/k/v/o projections inside
    MLP = "mlp"  # SwiGLU: down(silu(gate x) * up x); dense MLPs and shared experts
    ROUTER = "router"  # sigmoid scores, biased group-limited top-k selection, renormalise, scale
    EXPERTS = "experts"  # routed SwiGLU experts on stacked weights, weighted by the router
    ADD = "add"  # elementwise sum of its inputs (residuals, routed + shared)
    CONCAT = "concat"  # concatenation of its inputs on the last dim (MTP [embed; hidden])
    LINEAR = "linear"  # y = W x (+ b); params: weight [out, in]
    LM_HEAD = "lm_head"  # vocabulary projection; params: weight [V, H]
    OUTPUT = "output"  # marks a graph output; attrs: name

    def __str__(self) -> str:
        return self.value
