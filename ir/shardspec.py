"""The split of one tensor dimension over one mesh axis (`ShardSpec`) and the mesh's axes, apart
from placement.py's graph-reading helpers so the attribute records (attrs.py) can hold specs
without importing the graph. placement.py re-exports both names."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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
