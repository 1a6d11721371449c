"""Spec -> IR. Derived sizes (rotary dims, layer kinds, stacked expert shapes) are computed here.

Node names are the torch module paths of the emitted model (which follow transformers'
in-memory names), so a parameter's full IR name is its state-dict key. The MTP layer k lives at
`model.mtp.{k}`; the Hugging Face checkpoint calls it `model.layers.{num_layers + k}`.
"""

from __future__ import annotations

import json

from glmc.ir import (
    AddAttrs,
    AttentionAttrs,
    ConcatAttrs,
    DType,
    EmbedAttrs,
    ExpertsAttrs,
    Graph,
    GraphAttrs,
    InputAttrs,
    LinearAttrs,
    LmHeadAttrs,
    MlpAttrs,
    Node,
    Op,
    OutputAttrs,
    Param,
    ParamRole,
    RmsNormAttrs,
    RouterAttrs,
    verify,
)
from glmc.spec import ModelSpec


def lower(spec: ModelSpec, dtype: str = "bf16") -> Graph:
    """Build and verify the IR graph of `spec`, with weights stored in `dtype`."""
    return verify(_Lowering(spec, DType.parse(dtype)).run())


class _Lowering:
    def __init__(self, spec: ModelSpec, dtype: DType) -> None:
        self.spec = spec
        self.dt = dtype
        self.h = spec.hidden_size
        self.nodes: list[Node] = []

    def add(self, node: Node) -> str:
        self.nodes.append(node)
        return node.name

    def p(self, name: str, shape: tuple[int, ...], role: ParamRole, dtype: DType | None = None) -> Param:
        return Param(name, shape, dtype or self.dt, role)

    def run(self) -> Graph:
        s = self.spec
        x = self.add(Node("input_ids", Op.INPUT, attrs=InputAttrs(name="input_ids")))
        x = self.embed("model.embed_tokens", x, tied_to=None, layer=None)
        for i in range(s.num_layers):
            x = self.block(f"model.layers.{i}", x, layer=i, moe=i >= s.num_dense_layers)
        h = self.norm("model.norm", x, self.h, layer=None)
        head_tied = "model.embed_tokens.weight" if s.tie_word_embeddings else None
        logits = self.head("lm_head", h, tied_to=head_tied, layer=None, in_checkpoint=head_tied is None)
        self.add(Node("logits", Op.OUTPUT, (logits,), attrs=OutputAttrs(name="logits")))
        main_head = head_tied or "lm_head.weight"
        for k in range(s.num_mtp_layers):
            h = self.mtp(k, h, main_head)
        return Graph(
            s.name,
            tuple(self.nodes),
            GraphAttrs(
                dtype=self.dt,
                vocab_size=s.vocab_size,
                hidden_size=self.h,
                num_layers=s.num_layers,
                num_dense_layers=s.num_dense_layers,
                num_mtp_layers=s.num_mtp_layers,
                max_position_embeddings=s.max_position_embeddings,
                tie_word_embeddings=s.tie_word_embeddings,
                initializer_range=s.initializer_range,
            ),
        )

    # ---- building blocks ----------------------------------------------------------------------

    def embed(self, name: str, x: str, tied_to: str | None, layer: int | None) -> str:
        w = Param("weight", (self.spec.vocab_size, self.h), self.dt, ParamRole.EMBEDDING, tied_to=tied_to)
        return self.add(
            Node(name, Op.EMBED, (x,), (w,), EmbedAttrs(vocab=self.spec.vocab_size, dim=self.h, layer=layer))
        )

    def head(
        self, name: str, x: str, tied_to: str | None, layer: int | None, in_checkpoint: bool = True
    ) -> str:
        w = Param("weight", (self.spec.vocab_size, self.h), self.dt, ParamRole.OUTPUT, tied_to=tied_to)
        if not in_checkpoint:
            w = w.with_attrs(checkpoint=False)
        return self.add(
            Node(
                name, Op.LM_HEAD, (x,), (w,), LmHeadAttrs(vocab=self.spec.vocab_size, dim=self.h, layer=layer)
            )
        )

    def norm(self, name: str, x: str, dim: int, layer: int | None) -> str:
        w = self.p("weight", (dim,), ParamRole.NORM)
        return self.add(
            Node(name, Op.RMSNORM, (x,), (w,), RmsNormAttrs(dim=dim, eps=self.spec.norm_eps, layer=layer))
        )

    def block(self, name: str, x: str, layer: int, moe: bool) -> str:
        n = self.norm(f"{name}.input_layernorm", x, self.h, layer)
        a = self.attention(f"{name}.self_attn", n, layer)
        x = self.add(Node(f"{name}.attn_residual", Op.ADD, (x, a), attrs=AddAttrs(layer=layer)))
        n = self.norm(f"{name}.post_attention_layernorm", x, self.h, layer)
        f = (
            self.moe(f"{name}.mlp", n, layer)
            if moe
            else self.mlp(f"{name}.mlp", n, self.spec.mlp.intermediate_size, layer)
        )
        return self.add(Node(name, Op.ADD, (x, f), attrs=AddAttrs(layer=layer)))

    def attention(self, name: str, x: str, layer: int) -> str:
        att = self.spec.attention
        h, nh, nkv, d = self.h, att.num_heads, att.num_kv_heads, att.head_dim
        params = [self.p("q_proj.weight", (nh * d, h), ParamRole.WEIGHT)]
        if att.qkv_bias:
            params.append(self.p("q_proj.bias", (nh * d,), ParamRole.BIAS))
        params.append(self.p("k_proj.weight", (nkv * d, h), ParamRole.WEIGHT))
        if att.qkv_bias:
            params.append(self.p("k_proj.bias", (nkv * d,), ParamRole.BIAS))
        params.append(self.p("v_proj.weight", (nkv * d, h), ParamRole.WEIGHT))
        if att.qkv_bias:
            params.append(self.p("v_proj.bias", (nkv * d,), ParamRole.BIAS))
        params.append(self.p("o_proj.weight", (h, nh * d), ParamRole.WEIGHT))
        if att.qk_norm:
            params += [
                self.p("q_norm.weight", (d,), ParamRole.NORM),
                self.p("k_norm.weight", (d,), ParamRole.NORM),
            ]
        scaling = att.rope.scaling
        attrs = AttentionAttrs(
            hidden=h,
            num_heads=nh,
            num_kv_heads=nkv,
            head_dim=d,
            rotary_dim=int(d * att.rope.partial_rotary_factor),
            rope_theta=att.rope.theta,
            rope_scaling=json.dumps(scaling, sort_keys=True) if scaling else None,
            qk_norm=att.qk_norm,
            qkv_bias=att.qkv_bias,
            eps=self.spec.norm_eps,
            layer=layer,
        )
        return self.add(Node(name, Op.ATTENTION, (x,), tuple(params), attrs))

    def mlp(self, name: str, x: str, inter: int, layer: int) -> str:
        params = (
            self.p("gate_proj.weight", (inter, self.h), ParamRole.WEIGHT),
            self.p("up_proj.weight", (inter, self.h), ParamRole.WEIGHT),
            self.p("down_proj.weight", (self.h, inter), ParamRole.WEIGHT),
        )
        attrs = MlpAttrs(
            hidden=self.h, intermediate_size=inter, activation=self.spec.mlp.activation, layer=layer
        )
        return self.add(Node(name, Op.MLP, (x,), params, attrs))

    def moe(self, name: str, x: str, layer: int) -> str:
        m = self.spec.moe
        assert m is not None  # the spec validator guarantees a moe block for MoE layers
        e, i = m.num_experts, m.intermediate_size
        # The router runs in fp32 in every runtime; its correction bias is stored in fp32.
        router_params = [Param("weight", (e, self.h), self.dt, ParamRole.ROUTER)]
        if m.correction_bias:
            router_params.append(Param("e_score_correction_bias", (e,), DType.F32, ParamRole.ROUTER_BIAS))
        r = self.add(
            Node(
                f"{name}.gate",
                Op.ROUTER,
                (x,),
                tuple(router_params),
                RouterAttrs(
                    hidden=self.h,
                    num_experts=e,
                    top_k=m.top_k,
                    n_group=m.n_group,
                    topk_group=m.topk_group,
                    norm_topk_prob=m.norm_topk_prob,
                    routed_scaling_factor=m.routed_scaling_factor,
                    scoring=m.scoring,
                    layer=layer,
                ),
            )
        )
        # Stacked expert weights, gate rows before up rows: gate_up [E, 2I, H], down [E, H, I].
        experts = self.add(
            Node(
                f"{name}.experts",
                Op.EXPERTS,
                (x, r),
                (
                    Param("gate_up_proj", (e, 2 * i, self.h), self.dt, ParamRole.EXPERT),
                    Param("down_proj", (e, self.h, i), self.dt, ParamRole.EXPERT),
                ),
                ExpertsAttrs(
                    hidden=self.h,
                    num_experts=e,
                    top_k=m.top_k,
                    intermediate_size=i,
                    activation=self.spec.mlp.activation,
                    layer=layer,
                ),
            )
        )
        if not m.num_shared_experts:
            return experts
        shared = self.mlp(f"{name}.shared_experts", x, i * m.num_shared_experts, layer)
        return self.add(Node(name, Op.ADD, (experts, shared), attrs=AddAttrs(layer=layer)))

    def mtp(self, k: int, h_prev: str, main_head: str) -> str:
        """MTP layer k: u = eh_proj([enorm(embed(x_{t+k+1})); hnorm(h_t)]), a MoE block, then
        shared_head (norm, head). Its embedding and head are checkpoint copies of the main ones."""
        s = self.spec
        name, layer = f"model.mtp.{k}", s.num_layers + k
        ids = self.add(
            Node(
                f"{name}.input_ids",
                Op.INPUT,
                attrs=InputAttrs(name=f"mtp_input_ids.{k}", shift=k + 1, layer=layer),
            )
        )
        e = self.embed(f"{name}.embed_tokens", ids, tied_to="model.embed_tokens.weight", layer=layer)
        e = self.norm(f"{name}.enorm", e, self.h, layer)
        hn = self.norm(f"{name}.hnorm", h_prev, self.h, layer)
        cat = self.add(Node(f"{name}.concat", Op.CONCAT, (e, hn), attrs=ConcatAttrs(layer=layer)))
        u = self.add(
            Node(
                f"{name}.eh_proj",
                Op.LINEAR,
                (cat,),
                (self.p("weight", (self.h, 2 * self.h), ParamRole.WEIGHT),),
                LinearAttrs(in_features=2 * self.h, out_features=self.h, layer=layer),
            )
        )
        z = self.block(name, u, layer=layer, moe=True)
        hn = self.norm(f"{name}.shared_head.norm", z, self.h, layer)
        logits = self.head(f"{name}.shared_head.head", hn, tied_to=main_head, layer=layer)
        self.add(Node(f"mtp_logits.{k}", Op.OUTPUT, (logits,), attrs=OutputAttrs(name=f"mtp_logits.{k}")))
        return hn
