"""Analyses over a graph: parameter counts, FLOPs per token, KV-cache bytes per token.

Counting rules (reference/glm45-architecture.md §4):
- `total` and `active` follow the GLM-4.5 paper: MTP layers included, word embeddings and the
  output layer excluded; `active` counts top_k of num_experts routed experts per MoE layer.
- `checkpoint` is every tensor a full checkpoint holds, the MTP layer's copies of the
  embedding and head included (358.34B for GLM-4.5).
- `in_memory` is what a model instance holds (copies shared, embeddings included).
FP8 scales (role `scale`, added by quantize-fp8) are not parameters and are never counted;
`weight_bytes` includes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .attrs import AttentionAttrs, ExpertsAttrs
from .graph import Graph, Node, Param, ParamRole
from .ops import Op

_GEMM_ROLES = (ParamRole.WEIGHT, ParamRole.ROUTER, ParamRole.OUTPUT, ParamRole.EXPERT)


def _active_numel(node: Node, p: Param) -> int:
    if p.role is ParamRole.EXPERT:
        a = ExpertsAttrs.of(node)
        return p.numel * a.top_k // a.num_experts
    return p.numel


def is_mtp(g: Graph, node: Node) -> bool:
    layer = node.attrs.layer
    return layer is not None and layer >= g.attrs.num_layers


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    checkpoint: int
    in_memory: int
    embedding: int
    output: int
    mtp: int
    routed_experts: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_params(g: Graph) -> ParamCounts:
    total = active = checkpoint = in_memory = embedding = output = mtp = experts = 0
    for _, node, p in g.params():
        if p.role is ParamRole.SCALE:
            continue
        n = p.numel
        if p.attrs.checkpoint:
            checkpoint += n
        if p.tied_to is not None:
            continue
        in_memory += n
        if p.role is ParamRole.EMBEDDING:
            embedding += n
            continue
        if p.role is ParamRole.OUTPUT:
            output += n
            continue
        total += n
        active += _active_numel(node, p)
        if p.role is ParamRole.EXPERT:
            experts += n
        if is_mtp(g, node):
            mtp += n
    return ParamCounts(total, active, checkpoint, in_memory, embedding, output, mtp, experts)


def _gemm_flops(node: Node) -> int:
    """Multiply-adds x2 of every GEMM weight this node applies to one token."""
    return sum(2 * _active_numel(node, p) for p in node.params if p.role in _GEMM_ROLES)


def _attention_flops(node: Node, seq_len: int) -> int:
    # q.k and p.v over the causal context: a token at position t attends to t+1 keys, so the
    # mean context over a sequence of length S is (S + 1) / 2.
    a = AttentionAttrs.of(node)
    return 2 * 2 * a.num_heads * a.head_dim * (seq_len + 1) // 2


def node_flops(node: Node, seq_len: int = 4096) -> int:
    """Forward FLOPs one token spends in `node` (GEMMs, plus attention over the causal context)."""
    f = _gemm_flops(node)
    if node.op is Op.ATTENTION:
        f += _attention_flops(node, seq_len)
    return f


def flops_per_token(g: Graph, seq_len: int = 4096) -> dict[str, int]:
    """Forward FLOPs of the trunk and head (what inference runs), and training FLOPs
    (3x forward, MTP layers and their heads included, as GLM-4.5 trains with them)."""
    trunk = mtp = 0
    for n in g.nodes:
        f = node_flops(n, seq_len)
        if is_mtp(g, n):
            mtp += f
        else:
            trunk += f
    return {"seq_len": seq_len, "forward": trunk, "training": 3 * (trunk + mtp), "mtp_forward": mtp}


def kv_cache_bytes_per_token(g: Graph, dtype_bytes: int | None = None) -> dict[str, int]:
    """K and V bytes one token adds to the cache, for the trunk and for the MTP layers."""
    item = dtype_bytes if dtype_bytes is not None else g.attrs.dtype.itemsize
    trunk = mtp = 0
    for n in g.find(Op.ATTENTION):
        a = AttentionAttrs.of(n)
        b = 2 * a.num_kv_heads * a.head_dim * item
        if is_mtp(g, n):
            mtp += b
        else:
            trunk += b
    return {"trunk": trunk, "mtp": mtp, "dtype_bytes": item}


def weight_bytes(g: Graph) -> int:
    """Bytes of the parameters a model instance holds, at each parameter's own dtype."""
    return sum(p.nbytes for _, _, p in g.params() if p.tied_to is None)


def summary(g: Graph, seq_len: int = 4096) -> dict[str, Any]:
    counts = count_params(g)
    return {
        "params": counts.as_dict(),
        "flops_per_token": flops_per_token(g, seq_len),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(g),
        "weight_bytes": weight_bytes(g),
    }
