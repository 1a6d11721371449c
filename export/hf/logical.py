"""Read the Hugging Face (logical) tensors out of a checkpoint in any unsharded layout glmc
writes: plain Hugging Face, fused, and either of those in FP8 (dequantised on read).

A `LogicalSource` is the inverse of layout.py: given the layout the checkpoint was written in,
it knows where each logical tensor's elements lie (a flat element range of one stored tensor),
reads only those, and, if the stored tensor is FP8, the matching range of its scales. It checks
the whole checkpoint against the layout before any data is read, and every error names the
tensor and its file. It is also a `TensorReader` for `from_hf` (dequantised tensors in fp32).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from glmc.ir import CheckpointError, DType
from glmc.ir.quant import scale_suffix

from .fp8 import dequantize
from .layout import OutTensor, Piece
from .safetensors_io import TORCH_ST

_FP8 = DType.F8E4M3.safetensors  # the FP8 weights glmc reads (E4M3, with scales)


class RawCheckpoint(Protocol):
    """Stored tensors by name, readable in flat element ranges (safetensors_io.SafetensorsCheckpoint,
    or `DictCheckpoint` for tensors in memory)."""

    def keys(self) -> list[str]: ...

    def meta(self, name: str) -> tuple[tuple[int, ...], str]: ...

    def file_of(self, name: str) -> str: ...

    def describe(self) -> str: ...

    def read_range(
        self, name: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class DictCheckpoint:
    """A `RawCheckpoint` over tensors in memory (tests, and `glmc build` emitting a layout)."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str = "the tensors in memory") -> None:
        self.tensors, self.where = tensors, where

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        t = self.tensors[name]
        return tuple(t.shape), TORCH_ST.get(t.dtype, str(t.dtype))

    def file_of(self, name: str) -> str:
        return self.where

    def describe(self) -> str:
        return self.where

    def read_range(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        part = self.tensors[name].reshape(-1)[start:stop]
        return part if out is None else out.copy_(part)


@dataclass(frozen=True)
class _Location:
    stored: OutTensor
    offset: int  # flat element offset of the piece in the stored tensor
    piece: Piece
    scale_offset: int  # flat element offset of the piece's scales in the stored scale tensor


class LogicalSource:
    """Logical tensors of a checkpoint written in `layout` (from `plan_checkpoint` of the
    graph it was written from, without quantisation). `recipe` is the FP8 recipe its
    quantization_config declares, if any; FP8 tensors are recognised by their stored dtype."""

    def __init__(self, raw: RawCheckpoint, layout: list[OutTensor], recipe: str | None) -> None:
        self.raw, self.recipe = raw, recipe
        self._where: dict[str, _Location] = {}
        self._fallback: dict[str, str] = {}
        self._quantized: set[str] = set()
        present = set(raw.keys())
        self._check(layout, present)
        for t in layout:
            offset = scale_offset = 0
            for pc in t.pieces:
                if pc.fallback is not None:
                    self._fallback[pc.source] = pc.fallback
                if t.name in present:
                    self._where[pc.source] = _Location(t, offset, pc, scale_offset)
                offset += pc.numel
                if t.name in self._quantized and self.recipe is not None:
                    r, c = pc.scale_shape(self.recipe)
                    scale_offset += r * c

    # ---- checks -----------------------------------------------------------------------------

    def _check(self, layout: list[OutTensor], present: set[str]) -> None:
        expected: set[str] = set()
        missing = []
        for t in layout:
            expected.add(t.name)
            copy = all(pc.fallback is not None for pc in t.pieces)
            if t.name not in present:
                if not copy:
                    missing.append(t.name)
                continue
            shape, dt = self.raw.meta(t.name)
            where = self.raw.file_of(t.name)
            if shape != t.shape:
                raise CheckpointError(
                    f"{t.name} has shape {_fmt(shape)} in {where}, expected {_fmt(t.shape)}"
                )
            if dt == _FP8:
                self._check_fp8(t, where)
                expected.add(t.name + scale_suffix(self.recipe or "block128"))
            elif not _is_float(dt):
                raise CheckpointError(f"{t.name} has dtype {dt} in {where}, expected a floating dtype")
        problems = []
        if missing:
            problems.append(f"is missing {len(missing)} tensor(s): {_some(missing)}")
        unexpected = [n for n in list(self.raw.keys()) if n not in expected]
        if unexpected:
            problems.append(f"has {len(unexpected)} unexpected tensor(s): {_some(unexpected)}")
        if problems:
            raise CheckpointError(f"checkpoint {self.raw.describe()} " + "; and it ".join(problems))

    def _check_fp8(self, t: OutTensor, where: str) -> None:
        if self.recipe is None:
            raise CheckpointError(
                f"{t.name} is FP8 in {where} but the checkpoint's config.json has no FP8 quantization_config"
            )
        if len(t.shape) < 2:
            raise CheckpointError(f"{t.name} is FP8 in {where}, but only 2-D and stacked weights can be")
        scale = t.name + scale_suffix(self.recipe)
        per = [pc.scale_shape(self.recipe) for pc in t.pieces]
        groups = t.shape[0] if len(t.shape) == 3 else 1
        want = (*t.shape[:-2], sum(r for r, _ in per) // groups, per[0][1])
        if scale not in set(self.raw.keys()):
            raise CheckpointError(f"{t.name} is FP8 in {where} but its scales {scale} are missing")
        shape, dt = self.raw.meta(scale)
        # glmc writes fp32 scales; llm-compressor may store them in the model dtype.
        if shape != want or not _is_float(dt):
            raise CheckpointError(
                f"{scale} is {dt}{_fmt(shape)} in {self.raw.file_of(scale)}, expected F32{_fmt(want)} "
                f"({self.recipe} scales of {t.name})"
            )
        self._quantized.add(t.name)

    # ---- reading ----------------------------------------------------------------------------

    def location(self, name: str) -> _Location:
        loc = self._where.get(name)
        if loc is None and name in self._fallback:
            loc = self._where.get(self._fallback[name])
        if loc is None:
            raise CheckpointError(f"checkpoint {self.raw.describe()} has no tensor {name}")
        return loc

    def stored_dtype(self, name: str) -> str:
        """The dtype `name` is stored in (F8_E4M3 for an FP8 weight)."""
        return self.raw.meta(self.location(name).stored.name)[1]

    def read(
        self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows [rows) (all by default) of logical tensor `name`, all columns; FP8 weights come
        back dequantised in fp32, everything else in its stored dtype. `out` (contiguous, of
        the stored dtype, not for FP8) receives the elements without an intermediate copy."""
        loc = self.location(name)
        pc = loc.piece
        shape = pc.shape
        r0, r1 = rows if rows is not None else (0, shape[0])
        row = 1
        for d in shape[1:]:
            row *= d
        stored = loc.stored.name
        if stored not in self._quantized:
            flat = None if out is None else out.view(-1)
            x = self.raw.read_range(stored, loc.offset + r0 * row, loc.offset + r1 * row, flat)
            return x.view(r1 - r0, *shape[1:])
        assert self.recipe is not None
        # Dequantise whole blocks, then cut: a row range need not start on a block.
        step = 128 if self.recipe == "block128" else 1
        a0, a1 = r0 - r0 % step, min(shape[0], -(-r1 // step) * step)
        q = self.raw.read_range(stored, loc.offset + a0 * row, loc.offset + a1 * row).view(a1 - a0, row)
        s_cols = pc.scale_shape(self.recipe)[1]
        s0, s1 = a0 // step, -(-a1 // step)
        scale_name = stored + scale_suffix(self.recipe)
        s = self.raw.read_range(scale_name, loc.scale_offset + s0 * s_cols, loc.scale_offset + s1 * s_cols)
        w = dequantize(q, s.view(s1 - s0, s_cols), self.recipe)
        return w[r0 - a0 : r1 - a0]

    # ---- TensorReader / LocatedReader for from_hf -------------------------------------------

    def keys(self) -> list[str]:
        return list(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def describe(self) -> str:
        return self.raw.describe()

    def file_of(self, name: str) -> str:
        return self.raw.file_of(self.location(name).stored.name)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        loc = self.location(name)
        dt = self.raw.meta(loc.stored.name)[1]
        return loc.piece.shape, DType.F32.safetensors if dt == _FP8 else dt


def _is_float(safetensors_dtype: str) -> bool:
    d = DType.from_safetensors(safetensors_dtype)
    return d is not None and d.is_float


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
