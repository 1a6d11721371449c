"""The op set. One enum: every node in a graph is one of these.

`moe(x)` = shared(x) + sum over the top-k routed experts of w_k * expert_k(x), with GLM-4.5's
router (sigmoid, bias for selection only, group-limited top-k, renormalise, scale) inside. Under
expert parallelism its routed path is bracketed by explicit collectives: `dispatch =
all_to_all(x)` (each token copy travels to the EP rank holding its expert) precedes the node,
which then reads `(x, dispatch)`; `combine = all_to_all(moe)` brings the weighted expert outputs
back. The router and the shared expert always see the local tokens `x`.
"""

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
    # Written by passes, never by lowering:
    MOE = "moe"  # fuse-moe: router + routed experts (stacked) + shared expert in one node
    ALL_REDUCE = "all_reduce"  # shard: sum of partial results over a mesh axis (attrs: axis)
    ALL_GATHER = "all_gather"  # shard: concatenate shards over a mesh axis (attrs: axis, dim)
    ALL_TO_ALL = "all_to_all"  # shard: MoE token exchange over a mesh axis (attrs: axis, kind)
    SEND_RECV = "send_recv"  # shard: activations handed from one pipeline stage to the next

    def __str__(self) -> str:
        return self.value
