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

from glmc.ir import GlmcError, Graph, Node, Op

from .moe import moe_experts, route


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps); statistics in fp32, weight applied after casting back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(
    positions: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin [B, S, r] for NeoX rotate-half RoPE over the first r dims of each head."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim)
    )
    freqs = positions.float()[..., None] * inv_freq  # [B, S, r/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, nh, S, d]; rotates pairs (i, i + r/2) of the first r dims, passes the rest through."""
    r = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, n: Node) -> None:
        super().__init__()
        h, self.nh, self.nkv, self.d = (
            n.attr("hidden"),
            n.attr("num_heads"),
            n.attr("num_kv_heads"),
            n.attr("head_dim"),
        )
        self.rotary_dim, self.theta = n.attr("rotary_dim"), n.attr("rope_theta")
        if n.attr("rope_scaling", None) is not None:
            raise GlmcError(
                f"{n.name}: rope_scaling {n.attr('rope_scaling')} is not supported by the torch target yet"
            )
        bias = n.attr("qkv_bias")
        self.q_proj = nn.Linear(h, self.nh * self.d, bias=bias)
        self.k_proj = nn.Linear(h, self.nkv * self.d, bias=bias)
        self.v_proj = nn.Linear(h, self.nkv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.d, h, bias=False)
        self.qk_norm = n.attr("qk_norm")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.d, n.attr("eps"))
            self.k_norm = RMSNorm(self.d, n.attr("eps"))

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.nh, self.d)
        k = self.k_proj(x).view(B, S, self.nkv, self.d)
        v = self.v_proj(x).view(B, S, self.nkv, self.d)
        if self.qk_norm:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, d]
        cos, sin = rope_cos_sin(positions, self.rotary_dim, self.theta, q.dtype)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=1.0 / math.sqrt(self.d), enable_gqa=True
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.nh * self.d))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, n: Node) -> None:
        super().__init__()
        h, i = n.attr("hidden"), n.attr("intermediate_size")
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores; the correction bias steers selection only; weights renormalised, scaled."""

    def __init__(self, n: Node) -> None:
        super().__init__()
        e = n.attr("num_experts")
        self.top_k, self.n_group, self.topk_group = n.attr("top_k"), n.attr("n_group"), n.attr("topk_group")
        self.norm_topk_prob, self.scale = n.attr("norm_topk_prob"), n.attr("routed_scaling_factor")
        self.weight = nn.Parameter(torch.empty(e, n.attr("hidden")))
        # A buffer, not a parameter: loss-free balancing updates it outside the optimizer. Always fp32.
        self.e_score_correction_bias: Tensor | None
        if n.has_param("e_score_correction_bias"):
            self.register_buffer("e_score_correction_bias", torch.zeros(e, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (ids [T, k] int64, weights [T, k] fp32)."""
        return route(
            x,
            self.weight,
            self.e_score_correction_bias,
            top_k=self.top_k,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.scale,
        )

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Keep the correction bias in fp32 through model.to(dtype), as every runtime does.
        bias = self.e_score_correction_bias
        out = super()._apply(fn, recurse)
        if bias is not None and self.e_score_correction_bias is not None:
            self.e_score_correction_bias = self.e_score_correction_bias.to(torch.float32)
        return out


class Experts(nn.Module):
    """Routed experts on stacked weights: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""

    def __init__(self, n: Node) -> None:
        super().__init__()
        e, h, i = n.attr("num_experts"), n.attr("hidden"), n.attr("intermediate_size")
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        return moe_experts(x, self.gate_up_proj, self.down_proj, ids, weights)


class MoE(nn.Module):
    """sum_k w_k * expert_k(x) + shared(x); the shared expert is neither gated nor scaled."""

    def __init__(self, g: Graph, name: str) -> None:
        super().__init__()
        self.gate = Router(g.node(f"{name}.gate"))
        self.experts = Experts(g.node(f"{name}.experts"))
        shared = f"{name}.shared_experts"
        self.shared_experts = MLP(g.node(shared)) if g.has_node(shared) else None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        ids, weights = self.gate(xt)
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

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        eh = g.node(f"{name}.eh_proj")
        self.eh_proj = nn.Linear(eh.attr("in_features"), eh.attr("out_features"), bias=False)
        self.shared_head = SharedHead(g, f"{name}.shared_head")

    def forward_mtp(self, emb: Tensor, h: Tensor, positions: Tensor) -> Tensor:
        u = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))
        return self.shared_head.norm(super().forward(u, positions))


class GLMModel(nn.Module):
    def __init__(self, g: Graph) -> None:
        super().__init__()
        emb = g.node("model.embed_tokens")
        self.embed_tokens = nn.Embedding(emb.attr("vocab"), emb.attr("dim"))
        self.layers = nn.ModuleList(DecoderLayer(g, f"model.layers.{i}") for i in range(g.attr("num_layers")))
        self.norm = _norm(g.node("model.norm"))
        self.mtp = nn.ModuleList(MTPLayer(g, f"model.mtp.{k}") for k in range(g.attr("num_mtp_layers")))

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions)
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
            self.lm_head = nn.Linear(head.attr("dim"), head.attr("vocab"), bias=False)

    def head(self, h: Tensor) -> Tensor:
        if self.lm_head is None:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    def hidden(self, input_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.model(input_ids, positions)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        return self.head(self.hidden(input_ids, positions))

    def forward_with_mtp(self, input_ids: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits [B, S, V] and, per MTP layer k, logits [B, S-k-1, V] for tokens t + k + 2."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        h = self.hidden(input_ids, positions)
        logits = self.head(h)
        mtp_logits = []
        for k, layer in enumerate(cast("list[MTPLayer]", self.model.mtp)):
            # Position t combines h_t with the embedding of token t+1 (HF uses positions t+1;
            # RoPE only sees differences, so any constant offset gives the same result).
            emb = self.model.embed_tokens(input_ids[:, k + 1 :])
            h = layer.forward_mtp(emb, h[:, : emb.shape[1]], positions[:, k + 1 :])
            mtp_logits.append(self.head(h))
        return logits, mtp_logits

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
        for _, buf in self.named_buffers():
            buf.zero_()


def _norm(n: Node) -> RMSNorm:
    return RMSNorm(n.attr("dim"), n.attr("eps"))


_SUPPORTED = {Op.INPUT, Op.EMBED, Op.RMSNORM, Op.ATTENTION, Op.MLP, Op.ROUTER, Op.EXPERTS, Op.ADD, Op.CONCAT,
              Op.LINEAR, Op.LM_HEAD, Op.OUTPUT}  # fmt: skip


def _check_supported(g: Graph) -> None:
    for n in g.nodes:
        if n.op not in _SUPPORTED:
            raise GlmcError(f"the torch target cannot emit op {n.op} (node {n.name})")
        for p in n.params:
            if p.dtype.is_float8:
                raise GlmcError(
                    f"the torch target holds weights in bf16/fp32; {n.name}.{p.name} is {p.dtype}: "
                    "dequantize FP8 checkpoints when loading (glmc.from_pretrained does)"
                )


def build_model(
    g: Graph, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> GLMForCausalLM:
    """Instantiate the module tree of `g` (uninitialised weights on `device`, in `dtype`)."""
    with torch.device(device):
        model = GLMForCausalLM(g)
    return model.to(dtype)
