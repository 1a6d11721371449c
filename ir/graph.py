"""Frozen graph data structures. Nothing here mutates: change a node or graph with `replace()`.

A `Graph` is a tuple of `Node`s in topological order. Each node produces one value named after
the node; `inputs` name the nodes it reads. Parameters live on the node that uses them, with
names relative to the node (`q_proj.weight`); a parameter's full name is `node.name + "." +
param.name`, which is also its name in the emitted torch module. Attributes are typed records
(attrs.py): `node.attrs` is its op's record, `param.attrs` a `ParamAttrs`, `graph.attrs` a
`GraphAttrs`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum
from functools import cached_property
from typing import Any

from .attrs import GraphAttrs, NodeAttrs, ParamAttrs, Record, record_of
from .dtypes import DType
from .errors import AttrError
from .ops import Op

_UNSET: Any = NodeAttrs()  # Node's default: the op's record with every field at its default
_NO_PARAM_ATTRS = ParamAttrs()


def _typed(owner: str, make: type[Record], attrs: Any) -> Any:
    """`attrs`, which must be a `make` record; `_UNSET` becomes `make()` (every field at its
    default)."""
    if attrs is _UNSET:
        try:
            return make()
        except AttrError as e:
            raise AttrError(f"{owner}: {e}") from None
    if type(attrs) is not make:
        raise AttrError(f"{owner}: takes {make.__name__}, got {type(attrs).__name__}")
    return attrs


def _updated(owner: str, attrs: Record, updates: dict[str, Any]) -> Any:
    try:
        return attrs.updated(**updates)
    except AttrError as e:
        raise AttrError(f"{owner}: {e}") from None


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
    attrs: ParamAttrs = _NO_PARAM_ATTRS

    def __post_init__(self) -> None:
        object.__setattr__(self, "attrs", _typed(f"param {self.name}", ParamAttrs, self.attrs))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def with_attrs(self, **updates: Any) -> Param:
        """Set (or, with None, reset to the default) annotations such as placement or quantization."""
        return replace(self, attrs=_updated(f"param {self.name}", self.attrs, updates))


@dataclass(frozen=True)
class Node:
    name: str
    op: Op
    inputs: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()
    # The record of `op` (ir/attrs.py); left out, the record with every field at its default.
    attrs: NodeAttrs = _UNSET

    def __post_init__(self) -> None:
        object.__setattr__(self, "attrs", _typed(f"node {self.name}", record_of(self.op), self.attrs))

    def with_attrs(self, **updates: Any) -> Node:
        """A copy with attributes changed (keyword names checked; None resets to the default)."""
        return replace(self, attrs=_updated(f"node {self.name}", self.attrs, updates))

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
    attrs: GraphAttrs

    def __post_init__(self) -> None:
        object.__setattr__(self, "attrs", _typed(f"graph {self.name}", GraphAttrs, self.attrs))

    def with_attrs(self, **updates: Any) -> Graph:
        """A copy with attributes changed (keyword names checked; None resets to the default)."""
        return replace(self, attrs=_updated(f"graph {self.name}", self.attrs, updates))

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
