"""A minimal rewrite engine: walk the nodes once, let a rule replace each one.

A rule returns None (keep the node), a node, or a sequence of nodes (expand). Renamed outputs
are forwarded: if a rule replaces %a by nodes ending in %b, later inputs naming %a read %b.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from .graph import Graph, Node

Rule = Callable[[Node], "Node | Sequence[Node] | None"]


def rewrite(g: Graph, rule: Rule) -> Graph:
    out: list[Node] = []
    renamed: dict[str, str] = {}
    for node in g.nodes:
        if renamed:
            node = replace(node, inputs=tuple(renamed.get(i, i) for i in node.inputs))
        result = rule(node)
        if result is None:
            out.append(node)
            continue
        new = [result] if isinstance(result, Node) else list(result)
        if not new:
            raise ValueError(f"rewrite rule deleted node {node.name}; deleting needs an explicit replacement")
        if new[-1].name != node.name:
            renamed[node.name] = new[-1].name
        out.extend(new)
    return g.replace_nodes(out)
