"""Reassemble per-rank checkpoints into whole logical tensors: the inverse of sharding.

Every rank's tensors are cut back into their pieces (layout.py), and each piece is put where it
came from in its logical tensor; FP8 scales likewise, in block (or row) units. A piece held by
several ranks (replicated weights, KV-head replicas, redundant experts) must be identical on
each. The result is keyed like a Hugging Face checkpoint (`*_scale_inv` / `*_scale` next to
FP8 weights), so it compares directly with an unsharded conversion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from glmc.ir import CheckpointError, Graph
from glmc.ir.quant import scale_suffix

from .fp8 import BLOCK
from .layout import Piece, plan_checkpoint, rank_dir, ranks

Reader = Callable[[str], torch.Tensor]


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so replicas compare exactly (NaN payloads, signed zeros)."""
    return t.view(_BITS[t.element_size()])


class _Whole:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.data = torch.zeros(shape, dtype=dtype)
        self.seen = torch.zeros(shape, dtype=torch.bool)

    def put(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None, part: torch.Tensor) -> None:
        index = (slice(*rows),) if cols is None else (slice(*rows), slice(*cols))
        seen = self.seen[index]
        if seen.any() and not torch.equal(_bits(self.data[index])[seen], _bits(part)[seen]):
            raise CheckpointError(f"{name}: ranks disagree on a piece they should both hold")
        self.data[index] = part
        self.seen[index] = True


def assemble(graph: Graph, readers: dict[str, Reader]) -> dict[str, torch.Tensor]:
    """Logical tensors from the ranks of a sharded `graph`; `readers` maps each rank's folder
    name (`rank_dir`) to a function reading one tensor of that rank."""
    recipe = graph.attrs.quantization
    wholes: dict[str, _Whole] = {}
    for coords in ranks(graph):
        read = readers[rank_dir(coords) if coords is not None else ""]
        for t in plan_checkpoint(graph, coords):
            data = read(t.name).reshape(-1)
            scales = read(t.scale_name).reshape(-1) if t.scale_name else None
            off = s_off = 0
            for pc in t.pieces:
                part = data[off : off + pc.numel].view(pc.out_shape)
                _whole(wholes, pc.source, pc.shape, part.dtype).put(pc.source, pc.rows, pc.cols, part)
                off += pc.numel
                if scales is not None and recipe is not None:
                    shape = pc.scale_shape(recipe)
                    n = shape[0] * shape[1]
                    s_part = scales[s_off : s_off + n].view(shape)
                    s_off += n
                    full, rows, cols = _scale_region(pc, recipe)
                    _whole(wholes, pc.source + scale_suffix(recipe), full, torch.float32).put(
                        pc.source, rows, cols, s_part
                    )
    incomplete = [n for n, w in wholes.items() if not bool(w.seen.all())]
    if incomplete:
        raise CheckpointError(f"the ranks do not cover {len(incomplete)} tensor(s), first {incomplete[0]}")
    return {n: w.data for n, w in wholes.items()}


def _whole(wholes: dict[str, _Whole], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> _Whole:
    if name not in wholes:
        wholes[name] = _Whole(shape, dtype)
    return wholes[name]


def _scale_region(pc: Piece, recipe: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Full scale shape of the piece's logical tensor, and the rows/cols the piece's scales fill."""
    rows, cols = pc.shape[0], pc.shape[1]
    c0, c1 = pc.cols if pc.cols is not None else (0, cols)
    r0, r1 = pc.rows
    if recipe == "block128":
        b = BLOCK
        return (-(-rows // b), -(-cols // b)), (r0 // b, -(-r1 // b)), (c0 // b, -(-c1 // b))
    return (rows, 1), (r0, r1), (0, 1)
