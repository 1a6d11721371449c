"""The emitted PyTorch model: plain modules, stacked expert weights, GLM-4.5's exact math.

Shape legend: B batch, S sequence, H hidden, V vocab, E routed experts, I expert width,
k experts per token, T = B*S tokens, nh/nkv query/KV heads, d head dim, r rotary dims.

Module paths equal the IR node names (and transformers' in-memory names), so
`model.state_dict()` keys are the IR parameter names.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glmc.ir import (
    AttentionAttrs,
    EmbedAttrs,
    GlmcError,
    Graph,
    LmHeadAttrs,
    Node,
    Op,
    RmsNormAttrs,
    RouterAttrs,
)
from glmc.ir.quant import RECIPES, scale_param_name, scale_shape
from glmc.kernels.dispatch import dequantize_fp8

from .fp8 import FP8, FP8Linear, KeepDtypes, linear, quantize_param
from .moe import fp8_moe_experts, moe_experts, route
from .moe_static import moe_experts_static

KV = tuple[Tensor, Tensor]  # one layer's cache: k, v [B, nkv, P, d]


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps); statistics in fp32, weight applied after casting back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # x / sqrt(...) instead of x * rsqrt(...): the pattern ONNX Runtime fuses into one
        # SimplifiedLayerNormalization node (rsqrt exports as Sqrt + Reciprocal, which it does
        # not match). Set by the ONNX exporter only; the two differ in the last bit at most.
        self.divide = False

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        ms = xf.pow(2).mean(-1, keepdim=True) + self.eps
        xf = xf / torch.sqrt(ms) if self.divide else xf * torch.rsqrt(ms)
        return self.weight * xf.to(x.dtype)


Rope = tuple[Tensor, Tensor]
"""fp32 (cos, sin) [B, S, r]: computed once per forward by the model and handed to every layer
(a layer recomputing them would, once compiled, evaluate cos/sin per head and per layer)."""


def rope_cos_sin(positions: Tensor, rotary_dim: int, theta: float) -> Rope:
    """fp32 cos/sin [B, S, r] for NeoX rotate-half RoPE over the first r dims of each head."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim)
    )
    freqs = positions.float()[..., None] * inv_freq  # [B, S, r/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, nh, S, d]; rotates pairs (i, i + r/2) of the first r dims, passes the rest through.
    cos/sin are cast to x's dtype first (as transformers does)."""
    r = cos.shape[-1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def rotate_half_matrix(d: int, r: int) -> Tensor:
    """R [d, d] fp32 with x @ R = cat(-x2, x1, 0): apply_partial_rope's rotated half as a matmul."""
    rot = torch.zeros(d, d)
    i = torch.arange(r // 2)
    rot[i + r // 2, i] = -1
    rot[i, i + r // 2] = 1
    return rot


def rope_by_matmul(x: Tensor, cos: Tensor, sin: Tensor, rot: Tensor) -> Tensor:
    """apply_partial_rope as x * cos' + (x @ R) * sin', cos'/sin' padded to the head with 1/0 and
    R = `rotate_half_matrix`: the same products and sums element for element (R has one +-1 per
    column, so x @ R is exact), spelled with 4 graph nodes where slicing, negating and
    concatenating take 8. For the graph exporters (ONNX Runtime dedupes the pads, which every
    layer shares)."""
    d, r = x.shape[-1], cos.shape[-1]
    cos = F.pad(cos, (0, d - r), value=1.0)[:, None].to(x.dtype)
    sin = F.pad(sin, (0, d - r))[:, None].to(x.dtype)
    return x * cos + (x @ rot.to(x.dtype)) * sin


class Attention(nn.Module):
    def __init__(self, n: Node) -> None:
        super().__init__()
        a = AttentionAttrs.of(n)
        self.nh, self.nkv, self.d = a.num_heads, a.num_kv_heads, a.head_dim
        self.rotary_dim, self.theta = a.rotary_dim, a.rope_theta
        if a.rope_scaling is not None:
            raise GlmcError(
                f"{n.name}: rope_scaling {a.rope_scaling} is not supported by the torch target yet"
            )
        bias = a.qkv_bias
        # fuse-moe joins q/k/v into one qkv_proj (rows q, k, v); either may be FP8.
        self.fused = n.has_param("qkv_proj.weight")
        if self.fused:
            self.qkv_proj = linear(n.param("qkv_proj.weight"), bias)
        else:
            self.q_proj = linear(n.param("q_proj.weight"), bias)
            self.k_proj = linear(n.param("k_proj.weight"), bias)
            self.v_proj = linear(n.param("v_proj.weight"), bias)
        self.o_proj = linear(n.param("o_proj.weight"), False)
        self.scale = 1.0 / math.sqrt(self.d)
        self.qk_norm = a.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.d, a.eps)
            self.k_norm = RMSNorm(self.d, a.eps)
        self.grouped = False
        self.rotate_half: Tensor | None = None

    def graph_form(self, on: bool) -> None:
        """The form the ONNX exporter traces: cached attention as two matmuls per kv head (see
        `_attend`) and RoPE as a matmul (`rope_by_matmul`; its matrix a plain attribute, which
        the exporter takes as a constant, so checkpoints and buffers are untouched)."""
        self.grouped = on
        device = next(self.parameters()).device
        self.rotate_half = rotate_half_matrix(self.d, self.rotary_dim).to(device) if on else None

    def _qkv(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, nh, S, d], k and v [B, nkv, S, d], RoPE applied."""
        B, S, _ = x.shape
        if self.fused:
            qkv = self.qkv_proj(x).split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
            q, k, v = (t.reshape(B, S, -1, self.d) for t in qkv)
        else:
            q = self.q_proj(x).view(B, S, self.nh, self.d)
            k = self.k_proj(x).view(B, S, self.nkv, self.d)
            v = self.v_proj(x).view(B, S, self.nkv, self.d)
        if self.qk_norm:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rope
        if self.rotate_half is not None:
            rot = self.rotate_half
            return rope_by_matmul(q, cos, sin, rot), rope_by_matmul(k, cos, sin, rot), v
        return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin), v

    def _out(self, o: Tensor) -> Tensor:
        B, _, S, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.nh * self.d))

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        q, k, v = self._qkv(x, rope)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        return self._out(o)

    def forward_cached(self, x: Tensor, rope: Rope, past: KV, mask: Tensor) -> tuple[Tensor, KV]:
        """Attend over `past` (k, v [B, nkv, P, d]) plus the new tokens; `mask` [B, 1, S, P+S]
        is True where a query may attend. Returns the output and the grown cache (P+S)."""
        q, k, v = self._qkv(x, rope)
        k = torch.cat((past[0], k), dim=2)
        v = torch.cat((past[1], v), dim=2)
        return self._out(self._attend(q, k, v, mask)), (k, v)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """softmax(q k^T * scale, masked) v for q [B, nh, S, d], k/v [B, nkv, T, d] and a boolean
        `mask` [B, 1, S, T]. `grouped`: each kv head's nh/nkv query heads as one [G*S, d] block
        against its k, v, spelled as plain matmuls, where the exported form of SDPA with
        enable_gqa copies k and v once per query head and builds that copy from a dozen shape
        ops per layer. Masked scores take the dtype's lowest value, not -inf, so a row with no
        visible slot (only a padding query can have one) averages instead of yielding NaN."""
        if not self.grouped:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        B, nh, S, d = q.shape
        T, g = k.shape[2], nh // self.nkv
        scores = (q.reshape(B, self.nkv, g * S, d) @ k.transpose(-1, -2)) * self.scale
        scores = scores.view(B, self.nkv, g, S, T).masked_fill(~mask[:, :, None], torch.finfo(q.dtype).min)
        return (scores.softmax(-1).view(B, self.nkv, g * S, T) @ v).view(B, nh, S, d)

    def forward_static(
        self, x: Tensor, rope: Rope, cache: KV, slots: Tensor, mask: Tensor, at: Tensor | None = None
    ) -> Tensor:
        """Static cache: write the new tokens' k, v into the preallocated `cache` (k, v
        [B, nkv, T, d], slot = position) at `slots` [B, S], in place, then attend over all T
        slots under `mask` [B, 1, S, T]. Shapes never change from step to step (what a compiled
        step and a CUDA graph need); slots a query may not see hold stale or zero entries.
        `at` [B]: every token's k, v are written, but only the query at index at[b] of each
        row attends (output [B, 1, H]): a caller that reads one position per row."""
        q, k, v = self._qkv(x, rope)
        idx = slots[:, None, :, None].expand_as(k)  # per-row positions: rows may differ
        cache[0].scatter_(2, idx, k)
        cache[1].scatter_(2, idx, v)
        if at is not None:
            rows = torch.arange(q.shape[0], device=q.device)
            q, mask = q[rows, :, at][:, :, None], mask[rows, :, at][:, :, None]
        return self._out(self._attend(q, cache[0], cache[1], mask))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). `prefix` names the parameters inside a fused MoE node
    (`shared_experts.`); after fuse-moe gate and up are one gate_up_proj (gate rows first)."""

    def __init__(self, n: Node, prefix: str = "") -> None:
        super().__init__()
        self.fused = n.has_param(prefix + "gate_up_proj.weight")
        if self.fused:
            self.gate_up_proj = linear(n.param(prefix + "gate_up_proj.weight"), False)
        else:
            self.gate_proj = linear(n.param(prefix + "gate_proj.weight"), False)
            self.up_proj = linear(n.param(prefix + "up_proj.weight"), False)
        self.down_proj = linear(n.param(prefix + "down_proj.weight"), False)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(KeepDtypes):
    """Sigmoid scores; the correction bias steers selection only; weights renormalised, scaled.
    The correction bias and the counts stay fp32 through model.to(dtype), as every runtime
    keeps them (never rounded through the model dtype either)."""

    def __init__(self, n: Node, prefix: str = "") -> None:
        super().__init__()
        a = RouterAttrs.of(n)  # a router node, or a moe node (which has the router's fields)
        e = a.num_experts
        self.top_k, self.n_group, self.topk_group = a.top_k, a.n_group, a.topk_group
        self.norm_topk_prob, self.scale = a.norm_topk_prob, a.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(e, a.hidden))
        # A buffer, not a parameter: loss-free balancing updates it outside the optimizer. Always fp32.
        self.e_score_correction_bias: Tensor | None
        if n.has_param(prefix + "e_score_correction_bias"):
            self.register_buffer("e_score_correction_bias", torch.zeros(e, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Tokens routed to each expert since the last reset, counted in training forwards only
        # (loss-free balancing reads and zeroes it once per optimizer step). Not saved.
        self.tokens_per_expert: Tensor
        self.register_buffer("tokens_per_expert", torch.zeros(e, dtype=torch.float32), persistent=False)
        self.count_tokens = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (ids [T, k] int64, weights [T, k] fp32)."""
        ids, weights = route(
            x,
            self.weight,
            self.e_score_correction_bias,
            top_k=self.top_k,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.scale,
        )
        # Activation-checkpoint recompute runs this forward again with grad enabled: a trainer
        # that recomputes sets count_tokens = False there (or halves the counts).
        if self.count_tokens and self.training and torch.is_grad_enabled():
            with torch.no_grad():
                ones = torch.ones_like(ids, dtype=torch.float32).flatten()
                self.tokens_per_expert.index_add_(0, ids.flatten(), ones)
        return ids, weights

    def scores(self, x: Tensor) -> Tensor:
        """Unbiased sigmoid scores [T, E] in fp32 (for the sequence-level balance loss)."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 even under bf16 autocast
            return F.linear(x.float(), self.weight.float()).sigmoid()


class Experts(KeepDtypes):
    """Routed experts on stacked weights: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
    FP8 (after quantize-fp8): both are E4M3 buffers, each with its scales beside it
    (`gate_up_proj_scale_inv` [E, 2 ceil(I/128), ceil(H/128)] for block128: gate and up halves
    quantised separately)."""

    def __init__(self, n: Node, prefix: str = "") -> None:
        super().__init__()
        gu, dn = n.param(prefix + "gate_up_proj"), n.param(prefix + "down_proj")
        self.recipe: str | None = gu.attrs.quant
        if dn.attrs.quant != self.recipe:
            raise GlmcError(f"{n.name}: gate_up_proj and down_proj must share an FP8 recipe")
        self.gate_up_proj: Tensor
        self.down_proj: Tensor
        if self.recipe is None:
            self.gate_up_proj = nn.Parameter(torch.empty(gu.shape))
            self.down_proj = nn.Parameter(torch.empty(dn.shape))
        else:
            self.gate_up_scale = scale_param_name("gate_up_proj", self.recipe)
            self.down_scale = scale_param_name("down_proj", self.recipe)
            self.register_buffer("gate_up_proj", torch.empty(gu.shape, dtype=FP8))
            self.register_buffer(self.gate_up_scale, torch.empty(scale_shape(gu, self.recipe)))
            self.register_buffer("down_proj", torch.empty(dn.shape, dtype=FP8))
            self.register_buffer(self.down_scale, torch.empty(scale_shape(dn, self.recipe)))
        # Graph exporters flip this (moe_static.static_moe) for shapes that do not depend on routing.
        self.static_shapes = False

    def dequantized(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The FP8 expert weights in `dtype` (gate_up, down)."""
        assert self.recipe is not None
        half = self.gate_up_proj.shape[1] // 2
        gu = self._buffers[self.gate_up_scale]
        dn = self._buffers[self.down_scale]
        assert gu is not None and dn is not None
        return (
            dequantize_fp8(self.gate_up_proj, gu, recipe=self.recipe, segments=(half, half), dtype=dtype),
            dequantize_fp8(self.down_proj, dn, recipe=self.recipe, dtype=dtype),
        )

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        if self.recipe is not None:
            if self.static_shapes:  # graph exporters: dequantise in the graph, then gather
                return moe_experts_static(x, *self.dequantized(x.dtype), ids, weights)
            gu, dn = self._buffers[self.gate_up_scale], self._buffers[self.down_scale]
            assert gu is not None and dn is not None
            return fp8_moe_experts(
                x, self.gate_up_proj, gu, self.down_proj, dn, ids, weights, recipe=self.recipe
            )
        if self.static_shapes:
            return moe_experts_static(x, self.gate_up_proj, self.down_proj, ids, weights)
        return moe_experts(x, self.gate_up_proj, self.down_proj, ids, weights)


class MoE(nn.Module):
    """sum_k w_k * expert_k(x) + shared(x); the shared expert is neither gated nor scaled."""

    def __init__(self, g: Graph, name: str) -> None:
        super().__init__()
        self.shared_experts: MLP | None
        if g.has_node(name) and g.node(name).op is Op.MOE:  # fuse-moe: one node, prefixed params
            n = g.node(name)
            self.gate = Router(n, "gate.")
            self.experts = Experts(n, "experts.")
            has_shared = n.has_param("shared_experts.down_proj.weight")
            self.shared_experts = MLP(n, "shared_experts.") if has_shared else None
            return
        self.gate = Router(g.node(f"{name}.gate"))
        self.experts = Experts(g.node(f"{name}.experts"))
        shared = f"{name}.shared_experts"
        self.shared_experts = MLP(g.node(shared)) if g.has_node(shared) else None

    def forward(self, x: Tensor, stats: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """x [B, S, H]. With `stats`, appends (scores [B, S, E], ids [B, S, k]) for balance losses."""
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        ids, weights = self.gate(xt)
        if stats is not None:
            stats.append((self.gate.scores(xt).view(*shape[:-1], -1), ids.view(*shape[:-1], -1)))
        out = self.experts(xt, ids, weights).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, g: Graph, name: str) -> None:
        super().__init__()
        self.input_layernorm = _norm(g.node(f"{name}.input_layernorm"))
        self.self_attn = Attention(g.node(f"{name}.self_attn"))
        self.post_attention_layernorm = _norm(g.node(f"{name}.post_attention_layernorm"))
        mlp = f"{name}.mlp"
        self.mlp: nn.Module = MLP(g.node(mlp)) if g.node(mlp).op is Op.MLP else MoE(g, mlp)
        self.is_moe = isinstance(self.mlp, MoE)

    def forward(self, x: Tensor, rope: Rope, stats: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self._ffn(self.post_attention_layernorm(x), stats)

    def forward_cached(self, x: Tensor, rope: Rope, past: KV, mask: Tensor) -> tuple[Tensor, KV]:
        a, present = self.self_attn.forward_cached(self.input_layernorm(x), rope, past, mask)
        x = x + a
        return x + self._ffn(self.post_attention_layernorm(x), None), present

    def forward_static(
        self, x: Tensor, rope: Rope, cache: KV, slots: Tensor, mask: Tensor, at: Tensor | None = None
    ) -> Tensor:
        """`at` [B]: write every token's k, v; compute the rest at index at[b] of each row only."""
        a = self.self_attn.forward_static(self.input_layernorm(x), rope, cache, slots, mask, at)
        if at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), at][:, None]
        x = x + a
        return x + self._ffn(self.post_attention_layernorm(x), None)

    def _ffn(self, x: Tensor, stats: list[tuple[Tensor, Tensor]] | None) -> Tensor:
        return self.mlp(x, stats) if self.is_moe else self.mlp(x)


class SharedHead(nn.Module):
    """The MTP layer's output norm; its head is the main model's lm_head (a checkpoint copy)."""

    def __init__(self, g: Graph, name: str) -> None:
        super().__init__()
        self.norm = _norm(g.node(f"{name}.norm"))


class MTPLayer(DecoderLayer):
    """u = eh_proj([enorm(embed(x_{t+1})); hnorm(h_t)]) -> decoder block -> shared_head.norm."""

    def __init__(self, g: Graph, name: str) -> None:
        super().__init__(g, name)
        self.enorm = _norm(g.node(f"{name}.enorm"))
        self.hnorm = _norm(g.node(f"{name}.hnorm"))
        self.eh_proj = linear(g.node(f"{name}.eh_proj").param("weight"), False)
        self.shared_head = SharedHead(g, f"{name}.shared_head")

    def fuse(self, emb: Tensor, h: Tensor) -> Tensor:
        return self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))

    def forward_mtp(
        self, emb: Tensor, h: Tensor, rope: Rope, stats: list[tuple[Tensor, Tensor]] | None = None
    ) -> Tensor:
        return self.shared_head.norm(super().forward(self.fuse(emb, h), rope, stats))

    def forward_mtp_cached(
        self, emb: Tensor, h: Tensor, rope: Rope, past: KV, mask: Tensor
    ) -> tuple[Tensor, KV]:
        z, present = super().forward_cached(self.fuse(emb, h), rope, past, mask)
        return self.shared_head.norm(z), present

    def forward_mtp_static(
        self,
        emb: Tensor,
        h: Tensor,
        rope: Rope,
        cache: KV,
        slots: Tensor,
        mask: Tensor,
        at: Tensor | None = None,
    ) -> Tensor:
        z = super().forward_static(self.fuse(emb, h), rope, cache, slots, mask, at)
        return self.shared_head.norm(z)


class GLMModel(nn.Module):
    def __init__(self, g: Graph) -> None:
        super().__init__()
        emb = g.node("model.embed_tokens")
        self.embed_tokens = nn.Embedding(EmbedAttrs.of(emb).vocab, EmbedAttrs.of(emb).dim)
        self.layers = nn.ModuleList(DecoderLayer(g, f"model.layers.{i}") for i in range(g.attrs.num_layers))
        self.norm = _norm(g.node("model.norm"))
        self.mtp = nn.ModuleList(MTPLayer(g, f"model.mtp.{k}") for k in range(g.attrs.num_mtp_layers))
        ropes = {
            (cast(DecoderLayer, m).self_attn.rotary_dim, cast(DecoderLayer, m).self_attn.theta)
            for m in [*self.layers, *self.mtp]
        }
        if len(ropes) != 1:
            raise GlmcError(
                f"model.layers: every layer must share one RoPE (rotary_dim, rope_theta), got {ropes}"
            )
        ((self.rotary_dim, self.rope_theta),) = ropes

    def rope(self, positions: Tensor) -> Rope:
        """fp32 (cos, sin) [B, S, r] for `positions` [B, S], shared by every layer."""
        return rope_cos_sin(positions, self.rotary_dim, self.rope_theta)

    def forward(
        self, input_ids: Tensor, rope: Rope, stats: list[tuple[Tensor, Tensor]] | None = None
    ) -> Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, rope, stats)
        return self.norm(x)

    def forward_cached(
        self, input_ids: Tensor, rope: Rope, past: list[KV], mask: Tensor
    ) -> tuple[Tensor, list[KV]]:
        x = self.embed_tokens(input_ids)
        presents = []
        for layer, kv in zip(cast("list[DecoderLayer]", self.layers), past, strict=True):
            x, present = layer.forward_cached(x, rope, kv, mask)
            presents.append(present)
        return self.norm(x), presents

    def forward_static(
        self, input_ids: Tensor, rope: Rope, cache: list[KV], slots: Tensor, mask: Tensor
    ) -> Tensor:
        x = self.embed_tokens(input_ids)
        for layer, kv in zip(cast("list[DecoderLayer]", self.layers), cache, strict=True):
            x = layer.forward_static(x, rope, kv, slots, mask)
        return self.norm(x)


class GLMForCausalLM(nn.Module):
    """`model(input_ids)` -> logits [B, S, V]; `model.forward_with_mtp(input_ids)` adds the MTP
    layers' logits (layer k at position t predicts token t + k + 2)."""

    def __init__(self, g: Graph) -> None:
        super().__init__()
        _check_supported(g)
        self.graph = g
        self.model = GLMModel(g)
        head = g.node("lm_head")
        self.tie_word_embeddings = head.param("weight").tied_to is not None
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(LmHeadAttrs.of(head).dim, LmHeadAttrs.of(head).vocab, bias=False)

    def head(self, h: Tensor) -> Tensor:
        if self.lm_head is None:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    def hidden(self, input_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.model(input_ids, self.model.rope(positions))

    def forward(self, input_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        return self.head(self.hidden(input_ids, positions))

    def forward_with_mtp(
        self, input_ids: Tensor, stats: list[tuple[Tensor, Tensor]] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Logits [B, S, V] and, per MTP layer k, logits [B, S-k-1, V] for tokens t + k + 2.
        With `stats`, each MoE layer appends (scores, ids) for balance losses, MTP included."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        rope = self.model.rope(positions)
        h = self.model(input_ids, rope, stats)
        return self.head(h), self.mtp_logits(input_ids, h, rope, stats)

    def mtp_logits(
        self, input_ids: Tensor, h: Tensor, rope: Rope, stats: list[tuple[Tensor, Tensor]] | None = None
    ) -> list[Tensor]:
        """The MTP layers from the trunk's final (normed) hidden state `h` [B, S, H]: per layer k,
        logits [B, S-k-1, V]. A pipeline's last stage starts here (its trunk part ends in `h`)."""
        cos, sin = rope
        mtp_logits = []
        for k, layer in enumerate(cast("list[MTPLayer]", self.model.mtp)):
            # Position t combines h_t with the embedding of token t+1 (HF uses positions t+1;
            # RoPE only sees differences, so any constant offset gives the same result).
            emb = self.model.embed_tokens(input_ids[:, k + 1 :])
            h = layer.forward_mtp(emb, h[:, : emb.shape[1]], (cos[:, k + 1 :], sin[:, k + 1 :]), stats)
            mtp_logits.append(self.head(h))
        return mtp_logits

    # ---- inference with a KV cache (functional: caches in, grown caches out) -------------------

    def empty_cache(self, batch: int, mtp: bool = False) -> list[KV]:
        """Zero-length caches for the trunk layers (or, with mtp=True, the MTP layers)."""
        layers = self.model.mtp if mtp else self.model.layers
        out = []
        w = self.model.embed_tokens.weight  # the activations' dtype and device (never FP8)
        for layer in layers:
            att = cast(DecoderLayer, layer).self_attn
            empty = w.new_zeros(batch, att.nkv, 0, att.d)
            out.append((empty, empty.clone()))
        return out

    def forward_cached(
        self, input_ids: Tensor, positions: Tensor, past: list[KV], attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[KV]]:
        """Prefill or decode: input_ids [B, S] at `positions` [B, S] after P cached tokens.
        `attention_mask` [B, P+S] (1 = real token) masks padding. Returns logits [B, S, V], the
        final hidden state [B, S, H] (what the MTP layer reads) and the caches grown to P+S."""
        mask = attention_bias_mask(past[0][0].shape[2] if past else 0, input_ids, attention_mask)
        h, presents = self.model.forward_cached(input_ids, self.model.rope(positions), past, mask)
        return self.head(h), h, presents

    def mtp_cached(
        self,
        next_ids: Tensor,
        h: Tensor,
        positions: Tensor,
        past: KV,
        attention_mask: Tensor | None = None,
        layer: int = 0,
    ) -> tuple[Tensor, Tensor, KV]:
        """One MTP layer over new positions: next_ids [B, S] are the tokens after the positions
        whose trunk hidden states are `h` [B, S, H]. Returns draft logits, the MTP hidden state
        (fed back as `h` to chain drafts) and the grown MTP cache."""
        mtp = cast(MTPLayer, self.model.mtp[layer])
        mask = attention_bias_mask(past[0].shape[2], next_ids, attention_mask)
        rope = self.model.rope(positions)
        z, present = mtp.forward_mtp_cached(self.model.embed_tokens(next_ids), h, rope, past, mask)
        return self.head(z), z, present

    # ---- inference with a static KV cache (preallocated, written in place by position) ---------

    def static_cache(self, batch: int, length: int, mtp: bool = False) -> list[KV]:
        """Zeroed caches k, v [batch, nkv, length, d] for the trunk (or MTP) layers; slot t holds
        position t of each row, so rows of a batch advance independently."""
        layers = self.model.mtp if mtp else self.model.layers
        w = self.model.embed_tokens.weight  # the activations' dtype and device (never FP8)
        out = []
        for layer in layers:
            att = cast(DecoderLayer, layer).self_attn
            out.append(
                (w.new_zeros(batch, att.nkv, length, att.d), w.new_zeros(batch, att.nkv, length, att.d))
            )
        return out

    def forward_static(self, input_ids: Tensor, positions: Tensor, cache: list[KV]) -> tuple[Tensor, Tensor]:
        """input_ids [B, S] at `positions` [B, S] (per row; slot = position): writes their k, v
        into `cache` (from `static_cache`) and returns logits [B, S, V] and the final hidden
        state [B, S, H]. A query sees the slots at or before its own position; the caller
        guarantees those hold that row's tokens (written earlier or in this step)."""
        mask = static_attention_mask(positions, cache[0][0].shape[2])
        h = self.model.forward_static(input_ids, self.model.rope(positions), cache, positions, mask)
        return self.head(h), h

    def mtp_static(
        self, next_ids: Tensor, h: Tensor, positions: Tensor, cache: KV, layer: int = 0
    ) -> tuple[Tensor, Tensor]:
        """`mtp_cached` over a static MTP cache: (draft logits, MTP hidden state)."""
        z = self._mtp_hidden(next_ids, h, positions, cache, layer)
        return self.head(z), z

    def _mtp_hidden(
        self,
        next_ids: Tensor,
        h: Tensor,
        positions: Tensor,
        cache: KV,
        layer: int = 0,
        at: Tensor | None = None,
    ) -> Tensor:
        """The MTP layer's normed hidden state over a static cache (`at`: see forward_static)."""
        mtp = cast(MTPLayer, self.model.mtp[layer])
        mask = static_attention_mask(positions, cache[0].shape[2])
        rope = self.model.rope(positions)
        return mtp.forward_mtp_static(self.model.embed_tokens(next_ids), h, rope, cache, positions, mask, at)

    def greedy_verify_static(
        self, ids: Tensor, positions: Tensor, cache: list[KV], mtp_cache: KV
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The first part of a greedy MTP speculation round, for any number of drafts K:
        verify, acceptance, MTP catch-up and the next round's first draft.

        `ids` [B, K+1] = each row's last committed token, then its K drafts; `positions`
        [B, K+1] their positions (n-1 .. n-1+K for a row of n committed tokens). Returns
        - `best` [B, K+1]: the trunk's argmax after each position; the row commits
          best[:, :accepted+1] (the accepted drafts equal best's first `accepted` entries);
        - `accepted` [B]: drafts accepted (the longest prefix with ids[:, i+1] == best[:, i]);
        - `trunk_ok` [B, K+1]: whether those logits are all finite (the caller refuses to
          pick tokens from NaN/Inf);
        - `draft` [B] and `draft_ok` [B]: the next round's first draft, from the MTP layer at
          the row's last committed position, and whether its logits are finite;
        - `z` [B, 1, H]: the MTP hidden state there, which the chained drafts start from.
        The catch-up runs the MTP layer over all K+1 positions with next tokens `best`: the
        entries past a row's accepted ones read rejected tokens and sit past its committed
        tokens, where the next round overwrites them before any query sees them. Only each
        row's last committed position goes on past the MTP cache write (attention's output,
        the MoE, the head)."""
        logits, h = self.forward_static(ids, positions, cache)
        best = logits.argmax(-1)
        trunk_ok = logits.isfinite().all(-1)
        # Drafts matching the trunk's choice before them, counted up to the first miss (the
        # positions before any miss: a cumulative sum of misses still 0, since ONNX has no
        # CumProd); spelled without [:, 1:] slices, whose length S-1 an export would assume is
        # never 1 (K >= 2).
        s = torch.arange(ids.shape[1], device=ids.device)
        after = ids.gather(1, (s + 1).clamp(max=ids.shape[1] - 1).expand_as(ids))  # ids shifted left
        match = (after == best) & (s < ids.shape[1] - 1)
        accepted = ((~match).long().cumsum(-1) == 0).long().sum(-1)
        z = self._mtp_hidden(best, h, positions, mtp_cache, at=accepted)
        lg = self.head(z[:, 0])
        return best, accepted, trunk_ok, lg.argmax(-1), lg.isfinite().all(-1), z

    def greedy_round_static(
        self, ids: Tensor, positions: Tensor, cache: list[KV], mtp_cache: KV, draft_tokens: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One greedy MTP speculation round in one call (so it compiles as one graph):
        `greedy_verify_static`, then K-1 chained MTP steps from its first draft. Returns
        (best [B, K+1], accepted [B], drafts [B, K], trunk_ok [B, K+1], draft_ok [B, K])."""
        best, accepted, trunk_ok, draft, ok, z = self.greedy_verify_static(ids, positions, cache, mtp_cache)
        drafts, draft_ok = [draft], [ok]
        at = positions[:, :1] + accepted[:, None]  # each row's last committed position
        for j in range(1, draft_tokens):
            z = self._mtp_hidden(drafts[-1][:, None], z, at + j, mtp_cache)
            lg = self.head(z[:, 0])
            drafts.append(lg.argmax(-1))
            draft_ok.append(lg.isfinite().all(-1))
        return best, accepted, torch.stack(drafts, 1), trunk_ok, torch.stack(draft_ok, 1)

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """Transformers' init: normal(0, std) GEMM weights and embeddings, unit norms, zero biases."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * std)
        for m in self.modules():
            if isinstance(m, Router):
                for b in m.buffers():
                    b.zero_()
            # FP8 weights: quantised from the same normal(0, std) draw.
            if isinstance(m, FP8Linear):
                q8, s8 = quantize_param(
                    torch.randn(m.weight.shape, generator=generator) * std, m.recipe, m.segments
                )
                m.weight.copy_(q8)
                m.scale.copy_(s8)
            elif isinstance(m, Experts) and m.recipe is not None:
                half = m.gate_up_proj.shape[1] // 2
                for key, scale_key, segs in (
                    ("gate_up_proj", m.gate_up_scale, (half, half)),
                    ("down_proj", m.down_scale, (m.down_proj.shape[1],)),
                ):
                    w8, ws = m._buffers[key], m._buffers[scale_key]
                    assert w8 is not None and ws is not None
                    q8, s8 = quantize_param(torch.randn(w8.shape, generator=generator) * std, m.recipe, segs)
                    w8.copy_(q8)
                    ws.copy_(s8)


def attention_bias_mask(past_len: int, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Boolean [B, 1, S, P+S]: query i (absolute position P+i) sees keys j <= P+i that are not padding."""
    B, S = input_ids.shape
    j = torch.arange(past_len + S, device=input_ids.device)
    i = torch.arange(S, device=input_ids.device)[:, None] + past_len
    mask = (j[None, :] <= i)[None, None].expand(B, 1, S, past_len + S)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
    return mask


def static_attention_mask(positions: Tensor, length: int) -> Tensor:
    """Boolean [B, 1, S, T]: the query at position p sees cache slots 0..p of its own row."""
    slots = torch.arange(length, device=positions.device)
    return (slots[None, None, :] <= positions[:, :, None])[:, None]


def _norm(n: Node) -> RMSNorm:
    return RMSNorm(RmsNormAttrs.of(n).dim, RmsNormAttrs.of(n).eps)


_SUPPORTED = {Op.INPUT, Op.EMBED, Op.RMSNORM, Op.ATTENTION, Op.MLP, Op.ROUTER, Op.EXPERTS, Op.MOE, Op.ADD,
              Op.CONCAT, Op.LINEAR, Op.LM_HEAD, Op.OUTPUT}  # fmt: skip
_FP8_HOLDERS = {Op.ATTENTION, Op.MLP, Op.EXPERTS, Op.MOE, Op.LINEAR}


def _check_supported(g: Graph) -> None:
    for n in g.nodes:
        if n.op not in _SUPPORTED:
            raise GlmcError(f"the torch target cannot emit op {n.op} (node {n.name})")
        for p in n.params:
            if p.dtype.is_float8 and (n.op not in _FP8_HOLDERS or p.attrs.quant not in RECIPES):
                raise GlmcError(
                    f"the torch target cannot hold {n.name}.{p.name} as {p.dtype} "
                    f"(quant={p.attrs.quant}): FP8 GEMM weights of quantize-fp8 only"
                )


def build_model(
    g: Graph, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> GLMForCausalLM:
    """Instantiate the module tree of `g` (uninitialised weights on `device`, in `dtype`)."""
    with torch.device(device):
        model = GLMForCausalLM(g)
    return model.to(dtype)
