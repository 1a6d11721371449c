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
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # graph.py imports this module (through attrs.py) for ShardSpec
    from .graph import Graph, Node, Param

MESH_AXES = ("pp", "dp", "ep", "tp")


@dataclass(frozen=True)
class ShardSpec:
    axis: str
    dim: int
    segments: tuple[int, ...]
    replicas: tuple[int, ...]
    index: tuple[tuple[int, ...], ...] = ()

    def encode(self) -> tuple[Any, ...]:
        """The printed form."""
        return (self.axis, self.dim, self.segments, self.replicas, self.index)

    def segment_ranges(self, size: int, rank: int) -> list[tuple[int, int]]:
        """Per segment, the [start, stop) this rank holds, relative to the segment's start."""
        out = []
        for seg, rep in zip(self.segments, self.replicas, strict=True):
            chunks = size // rep
            step = seg // chunks
            c = rank // rep
            out.append((c * step, (c + 1) * step))
        return out

    def absolute_ranges(self, size: int, rank: int) -> list[tuple[int, int]]:
        """The [start, stop) ranges along `dim` this rank holds, in order."""
        if self.index:
            return [(i, i + 1) for i in self.index[rank]]
        out, base = [], 0
        for seg, (a, b) in zip(self.segments, self.segment_ranges(size, rank), strict=True):
            out.append((base + a, base + b))
            base += seg
        return out

    def local_size(self, size: int, rank: int) -> int:
        """Length of `dim` on `rank`, where `size` is the mesh axis size."""
        if self.index:
            return len(self.index[rank])
        return sum(b - a for a, b in self.segment_ranges(size, rank))

    def problems(self, shape: tuple[int, ...], size: int) -> list[str]:
        """What is inconsistent between this spec, a parameter shape and the axis size."""
        return list(_problems(self, shape, size))


@lru_cache(maxsize=1024)  # verification after every pass sees the same few specs per layer
def _problems(spec: ShardSpec, shape: tuple[int, ...], size: int) -> tuple[str, ...]:
    if spec.axis not in MESH_AXES:
        return (f"unknown mesh axis {spec.axis!r}",)
    if not 0 <= spec.dim < len(shape):
        return (f"shard dim {spec.dim} out of range for shape {list(shape)}",)
    if spec.index:
        if len(spec.index) != size:
            return (f"{spec.axis} index lists {len(spec.index)} ranks, the mesh has {size}",)
        bad = [i for r in spec.index for i in r if not 0 <= i < shape[spec.dim]]
        return (f"{spec.axis} index names positions {bad[:3]} outside [0, {shape[spec.dim]})",) if bad else ()
    out = []
    if sum(spec.segments) != shape[spec.dim] or len(spec.replicas) != len(spec.segments):
        out.append(f"segments {list(spec.segments)} do not tile dim {spec.dim} of {list(shape)}")
    for seg, rep in zip(spec.segments, spec.replicas, strict=False):
        if rep < 1 or size % rep or seg % (size // rep):
            out.append(f"segment {seg} cannot be split {size}-way over {spec.axis} with replicas {rep}")
    return tuple(out)


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
