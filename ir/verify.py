"""Structural and shape checks. Every pass's output goes through `verify`; a failure names the
node and what is wrong with it."""

from __future__ import annotations

from collections.abc import Callable

from .graph import Graph, Node, ParamRole
from .ops import Op


class VerifyError(ValueError):
    """The graph breaks an IR invariant."""


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


def _check_embed(n: Node) -> list[str]:
    return _arity(n, 1) + _shape(n, "weight", (n.attr("vocab"), n.attr("dim")))


def _check_rmsnorm(n: Node) -> list[str]:
    return _arity(n, 1) + _shape(n, "weight", (n.attr("dim"),))


def _check_attention(n: Node) -> list[str]:
    h, nh, nkv, d = n.attr("hidden"), n.attr("num_heads"), n.attr("num_kv_heads"), n.attr("head_dim")
    out = _arity(n, 1)
    if nh % nkv:
        out.append(f"num_heads {nh} not divisible by num_kv_heads {nkv}")
    rd = n.attr("rotary_dim")
    if rd % 2 or not 0 < rd <= d:
        out.append(f"rotary_dim {rd} must be even and in (0, head_dim={d}]")
    if n.has_param("qkv_proj.weight"):  # fused by a pass
        out += _shape(n, "qkv_proj.weight", ((nh + 2 * nkv) * d, h))
    else:
        out += _shape(n, "q_proj.weight", (nh * d, h))
        out += _shape(n, "k_proj.weight", (nkv * d, h))
        out += _shape(n, "v_proj.weight", (nkv * d, h))
    out += _shape(n, "o_proj.weight", (h, nh * d))
    if n.attr("qk_norm"):
        out += _shape(n, "q_norm.weight", (d,)) + _shape(n, "k_norm.weight", (d,))
    return out


def _check_mlp(n: Node) -> list[str]:
    h, i = n.attr("hidden"), n.attr("intermediate_size")
    out = _arity(n, 1)
    if n.has_param("gate_up_proj.weight"):
        out += _shape(n, "gate_up_proj.weight", (2 * i, h))
    else:
        out += _shape(n, "gate_proj.weight", (i, h)) + _shape(n, "up_proj.weight", (i, h))
    return out + _shape(n, "down_proj.weight", (h, i))


def _check_router(n: Node) -> list[str]:
    e, k = n.attr("num_experts"), n.attr("top_k")
    g, tg = n.attr("n_group"), n.attr("topk_group")
    out = _arity(n, 1) + _shape(n, "weight", (e, n.attr("hidden")))
    if k > e:
        out.append(f"top_k {k} exceeds num_experts {e}")
    if e % g or tg > g:
        out.append(f"bad grouping: num_experts {e}, n_group {g}, topk_group {tg}")
    if n.has_param("e_score_correction_bias"):
        out += _shape(n, "e_score_correction_bias", (e,))
    return out


def _check_experts(n: Node) -> list[str]:
    e, h, i = n.attr("num_experts"), n.attr("hidden"), n.attr("intermediate_size")
    out = _arity(n, 2) + _shape(n, "gate_up_proj", (e, 2 * i, h)) + _shape(n, "down_proj", (e, h, i))
    out += [f"parameter {p.name} must have role expert" for p in n.params if p.role is not ParamRole.EXPERT]
    return out


def _check_linear(n: Node) -> list[str]:
    return _arity(n, 1) + _shape(n, "weight", (n.attr("out_features"), n.attr("in_features")))


def _check_lm_head(n: Node) -> list[str]:
    return _arity(n, 1) + _shape(n, "weight", (n.attr("vocab"), n.attr("dim")))


def _check_variadic(n: Node) -> list[str]:
    return [] if len(n.inputs) >= 2 else [f"{n.op} needs at least 2 inputs"]


_CHECKS: dict[Op, Callable[[Node], list[str]]] = {
    Op.INPUT: lambda n: _arity(n, 0),
    Op.OUTPUT: lambda n: _arity(n, 1),
    Op.EMBED: _check_embed,
    Op.RMSNORM: _check_rmsnorm,
    Op.ATTENTION: _check_attention,
    Op.MLP: _check_mlp,
    Op.ROUTER: _check_router,
    Op.EXPERTS: _check_experts,
    Op.LINEAR: _check_linear,
    Op.LM_HEAD: _check_lm_head,
    Op.ADD: _check_variadic,
    Op.CONCAT: _check_variadic,
}
