"""The stable text form: one line per node, attributes and parameters in sorted order.

Golden tests store this text and humans diff it, so the format only changes deliberately:

    graph glm-tiny {dtype=bf16, hidden_size=64, ...}
      %model.layers.0.self_attn = attention(%model.layers.0.input_layernorm) {head_dim=32, ...} [q_proj.weight: bf16[128,64], ...]
"""

from __future__ import annotations

from typing import Any

from .attrs import Record
from .dtypes import DType
from .graph import Graph, Node, Param
from .placement import ShardSpec


def format_value(v: Any) -> str:
    if isinstance(v, ShardSpec):
        return format_value(v.encode())
    if isinstance(v, DType):
        return format_value(str(v))
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, tuple):
        # (x,) keeps its comma, as in Python, so a 1-tuple never reads as a scalar.
        return "(" + ", ".join(format_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if v is None:
        return "none"
    return str(v)


def format_attrs(attrs: Record) -> str:
    items = attrs.items()
    if not items:
        return ""
    return "{" + ", ".join(f"{k}={format_value(v)}" for k, v in items) + "}"


def format_param(p: Param) -> str:
    text = f"{p.name}: {p.dtype}[{','.join(str(d) for d in p.shape)}]"
    extras = []
    if p.tied_to:
        extras.append(f"tied_to={p.tied_to}")
    extras.extend(f"{k}={format_value(v)}" for k, v in p.attrs.items())
    if extras:
        text += " {" + ", ".join(extras) + "}"
    return text


def format_node(n: Node) -> str:
    line = f"%{n.name} = {n.op}({', '.join('%' + i for i in n.inputs)})"
    attrs = format_attrs(n.attrs)
    if attrs:
        line += " " + attrs
    if n.params:
        line += " [" + ", ".join(format_param(p) for p in n.params) + "]"
    return line


def format_graph(g: Graph) -> str:
    head = f"graph {g.name}"
    attrs = format_attrs(g.attrs)
    if attrs:
        head += " " + attrs
    return "\n".join([head, *("  " + format_node(n) for n in g.nodes)]) + "\n"
