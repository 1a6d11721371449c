"""Placements: how a parameter is split over the named axes of the device mesh.

The mesh has four named axes, outermost first: `pp` (pipeline stages), `dp` (data parallel),
`ep` (expert parallel; a data-parallel axis for everything that is not a routed expert) and
`tp` (tensor parallel). A parameter is replicated over every axis its `shard` attribute does not
name. Each `ShardSpec` splits one tensor dimension over one axis:

- `segments`: the dimension is a concatenation of independently split parts (fused q/k/v rows,
  gate/up halves); each part is cut into `axis_size // replicas[i]` equal chunks, and a rank
  takes chunk `rank // replicas[i]` of every part. `replicas > 1` is KV-head replication: with
  more TP ranks than KV heads, consecutive ranks share one head.
- `index`: an explicit list of positions per rank (the expert map of load-aware expert
  parallelism, which may hold some experts on several ranks).

A parameter's `attrs.shard` holds its specs; the printer writes each as the tuple
`(axis, dim, segments, replicas, index)`, so the printed IR shows every split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .shardspec import MESH_AXES as MESH_AXES
from .shardspec import ShardSpec as ShardSpec

if TYPE_CHECKING:
    from .graph import Graph, Node, Param


def shard_specs(p: Param) -> tuple[ShardSpec, ...]:
    return p.attrs.shard


def with_shards(p: Param, specs: tuple[ShardSpec, ...] | list[ShardSpec]) -> Param:
    return p.with_attrs(shard=tuple(specs))


def mesh_of(g: Graph) -> dict[str, int]:
    """Axis sizes of the graph's mesh (all 1 when no shard pass ran)."""
    sizes: dict[str, int] = dict(g.attrs.mesh)
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def stage_of(node: Node) -> int:
    return node.attrs.stage or 0


def local_shape(p: Param, mesh: Mapping[str, int], coords: Mapping[str, int]) -> tuple[int, ...]:
    """The shape of `p` on the rank at `coords` (axis -> rank index along it)."""
    shape = list(p.shape)
    for s in shard_specs(p):
        shape[s.dim] = s.local_size(mesh[s.axis], coords.get(s.axis, 0))
    return tuple(shape)


def max_local_numel(p: Param, mesh: Mapping[str, int]) -> int:
    """Elements of `p` on the rank that holds the most of it (splits are even except for
    load-aware expert maps, whose ranks all hold the same number of slots)."""
    shape = list(p.shape)
    for s in shard_specs(p):
        # Segment splits give every rank the same length; only an index map can differ. Not a
        # loop over ranks in Python: a mesh axis may have tens of thousands of them.
        shape[s.dim] = max(map(len, s.index)) if s.index else s.local_size(mesh[s.axis], 0)
    n = 1
    for d in shape:
        n *= d
    return n


def replicated_over(p: Param, mesh: Mapping[str, int]) -> int:
    """How many data-parallel ranks hold the same piece of `p`: `dp`, times `ep` unless the
    parameter is split over `ep` (routed experts)."""
    axes = {s.axis for s in shard_specs(p)}
    return mesh["dp"] * (1 if "ep" in axes else mesh["ep"])
