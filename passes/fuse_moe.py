"""fuse-moe: one MoE node per MoE layer, fused q/k/v and gate/up projections.

What changes, and why it is honest about "per-expert -> grouped":
- Lowering already holds the routed experts stacked (`experts.gate_up_proj` [E, 2I, H], gate
  rows first; `experts.down_proj` [E, H, I]), because that is the torch target's in-memory
  layout; but its checkpoint layout (`weight_layout` absent) is the Hugging Face one, one
  tensor per expert and projection. After this pass the graph says `weight_layout="fused"`: the
  stacked tensors are also what a checkpoint stores, and `glmc convert` stacks (and unstacks)
  the per-expert tensors accordingly (export/hf/layout.py).
- The router (sigmoid, bias for selection, group-limited top-k, renormalise, scale), the routed
  experts, the shared expert and their sum become one `moe` node. Parameter full names do not
  change (`model.layers.L.mlp.gate.weight`, `...mlp.experts.gate_up_proj`), so state-dict keys
  stay stable.
- Attention's q/k/v become one `qkv_proj` (weight and bias), and every gate/up pair (dense MLPs,
  the shared expert) one `gate_up_proj`, rows concatenated in that order. Each fused parameter
  records its components (`fused`) and their row counts (`segments`); FP8 scales and tensor
  parallelism treat the components separately, the way vLLM's merged layers do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from glmc.ir import ExpertsAttrs, FfnAttrs, Graph, MoeAttrs, Node, Op, Param, ParamAttrs, RouterAttrs

from .base import Pass, PassError


@dataclass(frozen=True)
class FuseMoE(Pass):
    name: ClassVar[str] = "fuse-moe"

    def apply(self, graph: Graph) -> Graph:
        if graph.attrs.weight_layout == "fused":
            raise PassError("fuse-moe: the graph is already fused")
        out: list[Node] = []
        renamed: dict[str, str] = {}
        nodes = list(graph.nodes)
        i = 0
        while i < len(nodes):
            node = _renamed_inputs(nodes[i], renamed)
            if node.op is Op.ROUTER:
                moe, consumed, old_out = _fuse_moe_block(nodes, i, renamed)
                out.append(moe)
                if old_out != moe.name:
                    renamed[old_out] = moe.name
                i += consumed
                continue
            if node.op is Op.ATTENTION:
                node = _fuse_qkv(node)
            elif node.op is Op.MLP:
                node = _fuse_gate_up(node, "")
            out.append(node)
            i += 1
        return graph.replace_nodes(out).with_attrs(weight_layout="fused")


def _renamed_inputs(node: Node, renamed: dict[str, str]) -> Node:
    if not renamed or not any(x in renamed for x in node.inputs):
        return node
    return replace(node, inputs=tuple(renamed.get(x, x) for x in node.inputs))


def _fused(parts: list[Param], name: str) -> Param:
    """Row-concatenate `parts` into one parameter named `name`."""
    first = parts[0]
    rows = tuple(p.shape[0] for p in parts)
    return Param(
        name,
        (sum(rows), *first.shape[1:]),
        first.dtype,
        first.role,
        attrs=ParamAttrs(fused=tuple(p.name for p in parts), segments=rows),
    )


def _fuse_qkv(n: Node) -> Node:
    by = {p.name: p for p in n.params}
    params = [_fused([by[f"{x}_proj.weight"] for x in "qkv"], "qkv_proj.weight")]
    if "q_proj.bias" in by:
        params.append(_fused([by[f"{x}_proj.bias"] for x in "qkv"], "qkv_proj.bias"))
    params += [p for p in n.params if not p.name.startswith(("q_proj.", "k_proj.", "v_proj."))]
    return replace(n, params=tuple(params))


def _fuse_gate_up(n: Node, prefix: str) -> Node:
    """An MLP node with gate/up fused; `prefix` renames its params (`shared_experts.`)."""
    by = {p.name: p for p in n.params}
    gate_up = _fused([by["gate_proj.weight"], by["up_proj.weight"]], "gate_up_proj.weight")
    gate_up = replace(gate_up, name=prefix + gate_up.name)
    gate_up = gate_up.with_attrs(fused=tuple(prefix + f for f in gate_up.attrs.fused))
    down = replace(by["down_proj.weight"], name=prefix + "down_proj.weight")
    return replace(n, params=(gate_up, down))


def _fuse_moe_block(nodes: list[Node], i: int, renamed: dict[str, str]) -> tuple[Node, int, str]:
    """Nodes i.. are router, experts[, shared MLP, add] of one MoE layer (the lowering's order).
    Returns the fused node, how many nodes it replaces, and the old output name."""
    router = _renamed_inputs(nodes[i], renamed)
    base = router.name.removesuffix(".gate")
    experts = nodes[i + 1] if i + 1 < len(nodes) else None
    if experts is None or experts.op is not Op.EXPERTS or experts.inputs[1:] != (router.name,):
        raise PassError(f"fuse-moe: router {router.name} is not followed by the experts node it routes")
    x = router.inputs[0]
    params = [replace(p, name=f"gate.{p.name}") for p in router.params]
    params += [replace(p, name=f"experts.{p.name}") for p in experts.params]
    consumed, old_out, shared_size = 2, experts.name, 0
    shared_name = f"{base}.shared_experts"
    if i + 3 < len(nodes) and nodes[i + 2].name == shared_name and nodes[i + 3].name == base:
        shared = _fuse_gate_up(nodes[i + 2], "shared_experts.")
        params += list(shared.params)
        shared_size = FfnAttrs.of(nodes[i + 2]).intermediate_size
        consumed, old_out = 4, base
    e, r = ExpertsAttrs.of(experts), RouterAttrs.of(router)
    attrs = MoeAttrs(
        hidden=e.hidden,
        num_experts=e.num_experts,
        top_k=e.top_k,
        intermediate_size=e.intermediate_size,
        shared_intermediate_size=shared_size,
        activation=e.activation,
        layer=e.layer,
        n_group=r.n_group,
        norm_topk_prob=r.norm_topk_prob,
        routed_scaling_factor=r.routed_scaling_factor,
        scoring=r.scoring,
        topk_group=r.topk_group,
    )
    return Node(base, Op.MOE, (x,), tuple(params), attrs), consumed, old_out
