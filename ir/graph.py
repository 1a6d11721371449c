"""Frozen graph data structures. Nothing here mutates: change a node or graph with `replace()`.

A `Graph` is a tuple of `Node`s in topological order. Each node produces one value named after
the node; `inputs` name the nodes it reads. Parameters live on the node that uses them, with
names relative to the node (`q_proj.weight`); a parameter's full name is `node.name + "." +
param.name`, which is also its name in the emitted torch module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cached_property
from typing import Any, TypeAlias

from .dtypes import DType
from .ops import Op

AttrValue: TypeAlias = "int | float | bool | str | tuple[AttrValue, ...] | None"
Attrs: TypeAlias = tuple[tuple[str, Any], ...]

_MISSING: Any = object()


def make_attrs(**kwargs: Any) -> Attrs:
    """Attributes as a sorted tuple of pairs: hashable, and printed in a stable order.
    A None value means "absent" and is dropped."""
    return tuple(sorted((k, v) for k, v in kwargs.items() if v is not None))


def _get(attrs: Attrs, key: str, default: Any, owner: str) -> Any:
    for k, v in attrs:
        if k == key:
            return v
    if default is _MISSING:
        raise KeyError(f"{owner} has no attribute {key!r}")
    return default


def _set(attrs: Attrs, **updates: Any) -> Attrs:
    merged = dict(attrs)
    merged.update(updates)
    return make_attrs(**merged)


class ParamRole(Enum):
    """What a parameter is for; analyses and passes select by role, not by name."""

    WEIGHT = "weight"  # a GEMM weight [out, in]
    BIAS = "bias"
    NORM = "norm"  # an RMSNorm scale
    EMBEDDING = "embedding"  # token embedding [V, H]
    OUTPUT = "output"  # vocabulary projection [V, H]
    ROUTER = "router"  # router weight [E, H]
    ROUTER_BIAS = "router_bias"  # loss-free-balance correction bias [E], fp32
    EXPERT = "expert"  # stacked routed-expert weights [E, ...]
    SCALE = "scale"  # FP8 dequantisation scales of another parameter (attrs: of)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    dtype: DType
    role: ParamRole
    # Set on checkpoint-only copies of another parameter (the MTP layer's embedding and head):
    # they are written to checkpoints but share storage with `tied_to` in memory.
    tied_to: str | None = None
    attrs: Attrs = ()

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def attr(self, key: str, default: Any = _MISSING) -> Any:
        return _get(self.attrs, key, default, f"param {self.name}")

    def with_attrs(self, **updates: Any) -> Param:
        """Set (or, with None, remove) annotations such as placement or quantization."""
        return replace(self, attrs=_set(self.attrs, **updates))


@dataclass(frozen=True)
class Node:
    name: str
    op: Op
    inputs: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()
    attrs: Attrs = ()

    def attr(self, key: str, default: Any = _MISSING) -> Any:
        return _get(self.attrs, key, default, f"node {self.name}")

    def with_attrs(self, **updates: Any) -> Node:
        return replace(self, attrs=_set(self.attrs, **updates))

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"node {self.name} has no parameter {name!r}")

    def has_param(self, name: str) -> bool:
        return any(p.name == name for p in self.params)


@dataclass(frozen=True)
class Graph:
    name: str
    nodes: tuple[Node, ...]
    attrs: Attrs = field(default=())

    def attr(self, key: str, default: Any = _MISSING) -> Any:
        return _get(self.attrs, key, default, f"graph {self.name}")

    def with_attrs(self, **updates: Any) -> Graph:
        return replace(self, attrs=_set(self.attrs, **updates))

    @cached_property
    def _index(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def node(self, name: str) -> Node:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"graph {self.name} has no node {name!r}") from None

    def has_node(self, name: str) -> bool:
        return name in self._index

    def find(self, op: Op) -> list[Node]:
        return [n for n in self.nodes if n.op is op]

    def params(self) -> Iterator[tuple[str, Node, Param]]:
        """Every parameter with its full name, in graph order."""
        for n in self.nodes:
            for p in n.params:
                yield f"{n.name}.{p.name}", n, p

    def replace_nodes(self, nodes: tuple[Node, ...] | list[Node]) -> Graph:
        return replace(self, nodes=tuple(nodes))
