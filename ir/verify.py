"""Structural and shape checks. Every pass's output goes through `verify`; a failure names the
node and what is wrong with it. Attribute names, types and their mutual consistency (`top_k`
within `num_experts`, a known mesh axis, a known FP8 recipe) are checked earlier, when a node's
record is made (attrs.py); this file checks what needs the graph: inputs, arity, parameter
shapes against the attributes, FP8 scales, placements against the mesh."""

from __future__ import annotations

from collections.abc import Callable

from . import attrs
from .dtypes import DType
from .errors import VerifyError
from .graph import Graph, Node, ParamRole
from .ops import Op
from .placement import mesh_of, shard_specs
from .quant import scale_param_name, scale_shape


def verify(g: Graph) -> Graph:
    """Return `g` unchanged if it is well formed, else raise `VerifyError` listing the problems."""
    problems: list[str] = []
    seen: set[str] = set()
    for n in g.nodes:
        if n.name in seen:
            problems.append(f"{n.name}: duplicate node name")
        for i in n.inputs:
            if i not in seen:
                problems.append(f"{n.name}: input %{i} is not defined before use")
        seen.add(n.name)
        names = [p.name for p in n.params]
        if len(set(names)) != len(names):
            problems.append(f"{n.name}: duplicate parameter names {names}")
        for p in n.params:
            if any(d <= 0 for d in p.shape):
                problems.append(f"{n.name}.{p.name}: non-positive dimension in shape {p.shape}")
        check = _CHECKS.get(n.op)
        if check is not None:
            problems.extend(f"{n.name}: {msg}" for msg in check(n))
        problems.extend(f"{n.name}: {msg}" for msg in _check_quant(n))
    problems.extend(_check_placements(g))
    all_params = {fqn for fqn, _, _ in g.params()}
    for fqn, _, p in g.params():
        if p.tied_to is not None and p.tied_to not in all_params:
            problems.append(f"{fqn}: tied_to {p.tied_to} names no parameter")
    if not g.find(Op.OUTPUT):
        problems.append("graph has no output node")
    if problems:
        raise VerifyError(f"graph {g.name} failed verification:\n  " + "\n  ".join(problems))
    return g


def _arity(n: Node, k: int) -> list[str]:
    return [] if len(n.inputs) == k else [f"{n.op} takes {k} input(s), got {len(n.inputs)}"]


def _shape(n: Node, name: str, shape: tuple[int, ...]) -> list[str]:
    if not n.has_param(name):
        return [f"missing parameter {name}"]
    got = n.param(name).shape
    return [] if got == shape else [f"parameter {name} has shape {list(got)}, expected {list(shape)}"]


def _check_vocab(n: Node) -> list[str]:
    a = attrs.VocabAttrs.of(n)
    return _arity(n, 1) + _shape(n, "weight", (a.vocab, a.dim))


def _check_rmsnorm(n: Node) -> list[str]:
    return _arity(n, 1) + _shape(n, "weight", (attrs.RmsNormAttrs.of(n).dim,))


def _check_linear(n: Node) -> list[str]:
    a = attrs.LinearAttrs.of(n)
    return _arity(n, 1) + _shape(n, "weight", (a.out_features, a.in_features))


def _check_attention(n: Node) -> list[str]:
    a = attrs.AttentionAttrs.of(n)
    h, nh, nkv, d = a.hidden, a.num_heads, a.num_kv_heads, a.head_dim
    out = _arity(n, 1)
    if n.has_param("qkv_proj.weight"):  # fused by a pass
        out += _shape(n, "qkv_proj.weight", ((nh + 2 * nkv) * d, h))
    else:
        out += _shape(n, "q_proj.weight", (nh * d, h))
        out += _shape(n, "k_proj.weight", (nkv * d, h))
        out += _shape(n, "v_proj.weight", (nkv * d, h))
    out += _shape(n, "o_proj.weight", (h, nh * d))
    if a.qk_norm:
        out += _shape(n, "q_norm.weight", (d,)) + _shape(n, "k_norm.weight", (d,))
    return out


def _check_mlp(n: Node) -> list[str]:
    a = attrs.FfnAttrs.of(n)
    return _arity(n, 1) + _swiglu(n, "", a.hidden, a.intermediate_size)


def _swiglu(n: Node, prefix: str, h: int, i: int) -> list[str]:
    if n.has_param(prefix + "gate_up_proj.weight"):
        out = _shape(n, prefix + "gate_up_proj.weight", (2 * i, h))
    else:
        out = _shape(n, prefix + "gate_proj.weight", (i, h)) + _shape(n, prefix + "up_proj.weight", (i, h))
    return out + _shape(n, prefix + "down_proj.weight", (h, i))


def _router_shapes(n: Node, prefix: str, a: attrs.RouterAttrs) -> list[str]:
    out = _shape(n, prefix + "weight", (a.num_experts, a.hidden))
    if n.has_param(prefix + "e_score_correction_bias"):
        out += _shape(n, prefix + "e_score_correction_bias", (a.num_experts,))
    return out


def _expert_shapes(n: Node, prefix: str, a: attrs.ExpertsAttrs) -> list[str]:
    e, h, i = a.num_experts, a.hidden, a.intermediate_size
    return _shape(n, prefix + "gate_up_proj", (e, 2 * i, h)) + _shape(n, prefix + "down_proj", (e, h, i))


def _check_router(n: Node) -> list[str]:
    return _arity(n, 1) + _router_shapes(n, "", attrs.RouterAttrs.of(n))


def _check_experts(n: Node) -> list[str]:
    out = _arity(n, 2) + _expert_shapes(n, "", attrs.ExpertsAttrs.of(n))
    out += [
        f"parameter {p.name} must have role expert"
        for p in n.params
        if p.role not in (ParamRole.EXPERT, ParamRole.SCALE)
    ]
    return out


def _check_moe(n: Node) -> list[str]:
    a = attrs.MoeAttrs.of(n)
    out = [] if len(n.inputs) in (1, 2) else [f"moe takes 1 input (2 with a dispatch), got {len(n.inputs)}"]
    out += _router_shapes(n, "gate.", a) + _expert_shapes(n, "experts.", a)
    if a.shared_intermediate_size:
        out += _swiglu(n, "shared_experts.", a.hidden, a.shared_intermediate_size)
    return out


def _check_quant(n: Node) -> list[str]:
    """Every FP8 weight has its scale parameter with the recipe's shape, and every scale has
    its weight."""
    out = []
    for p in n.params:
        recipe = p.attrs.quant
        if p.role is ParamRole.SCALE:
            of = p.attrs.of
            if of is None or not n.has_param(of) or n.param(of).attrs.quant is None:
                out.append(f"scale {p.name} names no quantised parameter (of={of})")
            continue
        if recipe is None:
            continue
        if p.dtype is not DType.F8E4M3:
            out.append(f"parameter {p.name} is quantised ({recipe}) but stored as {p.dtype}")
        sname = scale_param_name(p.name, recipe)
        if not n.has_param(sname):
            out.append(f"parameter {p.name} is quantised ({recipe}) but has no {sname}")
            continue
        got, want = n.param(sname).shape, scale_shape(p, recipe)
        if got != want:
            out.append(f"scale {sname} has shape {list(got)}, expected {list(want)}")
    return out


def _check_placements(g: Graph) -> list[str]:
    mesh = mesh_of(g)
    out = []
    for n in g.nodes:
        stage = n.attrs.stage or 0
        if stage >= mesh["pp"]:
            out.append(f"{n.name}: stage {stage} outside the mesh's {mesh['pp']} pipeline stage(s)")
        for p in n.params:
            for spec in shard_specs(p):
                out += [f"{n.name}.{p.name}: {m}" for m in spec.problems(p.shape, mesh.get(spec.axis, 1))]
    return out


def _check_variadic(n: Node) -> list[str]:
    return [] if len(n.inputs) >= 2 else [f"{n.op} needs at least 2 inputs"]


_CHECKS: dict[Op, Callable[[Node], list[str]]] = {
    Op.INPUT: lambda n: _arity(n, 0),
    Op.OUTPUT: lambda n: _arity(n, 1),
    Op.EMBED: _check_vocab,
    Op.RMSNORM: _check_rmsnorm,
    Op.ATTENTION: _check_attention,
    Op.MLP: _check_mlp,
    Op.ROUTER: _check_router,
    Op.EXPERTS: _check_experts,
    Op.LINEAR: _check_linear,
    Op.LM_HEAD: _check_vocab,
    Op.ADD: _check_variadic,
    Op.CONCAT: _check_variadic,
    Op.MOE: _check_moe,
    **{op: lambda n: _arity(n, 1) for op in (Op.ALL_REDUCE, Op.ALL_GATHER, Op.ALL_TO_ALL, Op.SEND_RECV)},
}
