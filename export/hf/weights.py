"""Streaming weight transforms between glmc's in-memory state dict and the Hugging Face layout.

`to_hf` and `from_hf` are inverses: `from_hf(g, dict(to_hf(g, state)))` returns `state` bit for
bit when `state` is in the graph's dtypes. Names, shapes and where each tensor lies in its
parameter come from `names.hf_tensors`, that is from the layout engine (layout.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from glmc.ir import CheckpointError, DType, Graph, ParamRole
from glmc.ir.naming import hf_layer

from .names import HFTensor, hf_tensors
from .safetensors_io import TORCH_DTYPES, TORCH_ST


class TensorReader(Protocol):
    """What `from_hf` reads: a name -> tensor mapping (a dict, or a `SafetensorsCheckpoint`)."""

    def keys(self) -> Iterable[str]: ...

    def __getitem__(self, name: str, /) -> torch.Tensor: ...


@runtime_checkable
class LocatedReader(Protocol):
    """A reader that knows its files and tensor metadata without loading data."""

    def describe(self) -> str: ...

    def file_of(self, name: str) -> str: ...

    def meta(self, name: str) -> tuple[tuple[int, ...], str]: ...


def to_hf(graph: Graph, state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(checkpoint name, tensor)` in graph order, each contiguous and in the graph's dtype.

    Experts come out as views into the stacked tensors when no cast is needed; the MTP
    embed/head copies are real copies, so no two yielded tensors share memory."""
    dense: dict[str, torch.Tensor] = {}  # non-contiguous parameters of the current node, made contiguous once
    for t in hf_tensors(graph):
        yield t.name, _export(t, state, dense)


def from_hf(
    graph: Graph, reader: TensorReader, dtype: torch.dtype | None = None, allow_nonfinite: bool = False
) -> dict[str, torch.Tensor]:
    """Read a Hugging Face layout into glmc's state dict (keys: IR parameter full names).

    Weights are cast to `dtype` (default: each parameter's IR dtype); the router correction
    bias, and any parameter the graph keeps in a dtype other than the model dtype, keep their
    IR dtype. Raises `CheckpointError` naming the tensor (and file) on a missing, unexpected,
    wrong-shaped or wrong-typed tensor, before loading any data. The MTP embed/head copies may
    be absent (GLM-4.6 ships none); they are checked but never read. Each tensor is checked
    for NaN/Inf after the cast (which may overflow) unless `allow_nonfinite`. With a plain dict
    as `reader`, tensors already in the target dtype are returned as they are, not copied."""
    plan = hf_tensors(graph)
    src = _Source(reader)
    _check_names(graph, plan, src)
    _check_meta(plan, src)
    model_dtype = graph.attrs.dtype
    state: dict[str, torch.Tensor] = {}
    for t in plan:
        if t.copy:
            continue
        target = _target_dtype(t, model_dtype, dtype)
        if t.whole:
            state[t.param] = loaded = src.load(t.name).to(target)
        else:
            if t.param not in state:
                state[t.param] = torch.empty(t.param_shape, dtype=target)
            loaded = _part(state[t.param], t)
            loaded.copy_(src.load(t.name))
        if not allow_nonfinite:
            check_finite(loaded, t.name, src.where(t.name))
    return state


def check_finite(t: torch.Tensor, name: str, where: str, origin: Sequence[int] = ()) -> None:
    """Raise `CheckpointError` naming tensor `name` (read from `where`) if it holds NaN or Inf.
    The count and first index are computed only on failure (`t` may be a block of `name`
    starting at index `origin`)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    # aminmax propagates NaN and sees +/-Inf as the extremes, in one vectorised pass: about 25x
    # the speed of isfinite(t).all() on CPU, which materialises a bool tensor (measured on
    # bf16/fp16/fp32). One thread: the pass is memory-bound (2-3.5 GB/s on one core), and on a
    # busy machine a parallel region waits ~20 ms for a descheduled worker, per tensor, which
    # made checks 70% of a convert of 1 MB expert tensors on a loaded 2-core box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lo, hi = torch.aminmax(t if t.element_size() > 1 else t.float())
    finally:
        torch.set_num_threads(n)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    bad = ~torch.isfinite(t)
    at = [int(i) for i in bad.nonzero()[0]]
    first = [i + (origin[d] if d < len(origin) else 0) for d, i in enumerate(at)]
    raise CheckpointError(
        f"{name} in {where} holds {int(bad.sum())} non-finite value(s) (NaN or Inf; the first at "
        f"{first}); refusing non-finite weights (--allow-nonfinite, or allow_nonfinite=True, keeps them)"
    )


# ---- to_hf helpers ------------------------------------------------------------------------------


def _export(t: HFTensor, state: Mapping[str, torch.Tensor], dense: dict[str, torch.Tensor]) -> torch.Tensor:
    if t.param not in state:
        raise KeyError(f"state dict has no {t.param!r}, needed for checkpoint tensor {t.name}")
    w = state[t.param].detach()
    if tuple(w.shape) != t.param_shape:
        raise ValueError(
            f"state dict tensor {t.param} has shape {_fmt(w.shape)}, expected {_fmt(t.param_shape)}"
        )
    if not t.whole and not w.is_contiguous():
        # A part is a flat range of its parameter; an experts node's two parameters alternate.
        if t.param not in dense:
            if len(dense) >= 2:
                dense.clear()
            dense[t.param] = w.contiguous()
        w = dense[t.param]
    w = _part(w, t)
    dt = TORCH_DTYPES[t.dtype]
    # Copies must not alias their source: safetensors refuses tensors that share memory.
    # (`to` keeps a strided tensor as it is when nothing converts, hence `contiguous`.)
    return w.to(dtype=dt, copy=t.copy).contiguous()


def _part(w: torch.Tensor, t: HFTensor) -> torch.Tensor:
    """The checkpoint tensor's part of its (stacked) IR parameter, as a view when `w` is
    contiguous: the parameter is its checkpoint tensors back to back (names.py)."""
    if t.whole:
        return w
    return w.reshape(-1)[t.offset : t.offset + t.numel].view(t.shape)


# ---- from_hf helpers ----------------------------------------------------------------------------


class _Source:
    """Uniform access to a plain mapping or a `LocatedReader` (file names, lazy metadata)."""

    def __init__(self, reader: TensorReader) -> None:
        self.reader = reader
        self.located = reader if isinstance(reader, LocatedReader) else None

    def describe(self) -> str:
        return f"checkpoint {self.located.describe()}" if self.located else "the tensor mapping"

    def where(self, name: str) -> str:
        return self.located.file_of(name) if self.located else "the tensor mapping"

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        if self.located:
            return self.located.meta(name)
        w = self.reader[name]
        return tuple(w.shape), TORCH_ST.get(w.dtype, str(w.dtype))

    def load(self, name: str) -> torch.Tensor:
        return self.reader[name]


def _check_names(graph: Graph, plan: list[HFTensor], src: _Source) -> None:
    present = list(src.reader.keys())
    present_set = set(present)
    expected = {t.name for t in plan}
    missing = [t.name for t in plan if not t.copy and t.name not in present_set]
    unexpected = [n for n in present if n not in expected]
    problems = []
    if missing:
        problems.append(f"is missing {len(missing)} tensor(s): {_some(missing)}")
    if unexpected:
        problems.append(f"has {len(unexpected)} unexpected tensor(s): {_some(unexpected)}")
    if problems:
        hint = _mtp_hint(graph, missing, unexpected)
        raise CheckpointError(f"{src.describe()} " + "; and it ".join(problems) + hint)


def _check_meta(plan: list[HFTensor], src: _Source) -> None:
    present = set(src.reader.keys())
    for t in plan:
        if t.name not in present:
            continue  # an absent MTP copy (GLM-4.6 ships none)
        shape, dt = src.meta(t.name)
        if shape != t.shape:
            raise CheckpointError(
                f"{t.name} has shape {_fmt(shape)} in {src.where(t.name)}, expected {_fmt(t.shape)}"
            )
        want = t.safetensors_dtype
        # Floating dtypes convert by a plain cast; anything else (FP8 needs its scales,
        # integers are not weights) must match the graph exactly.
        if dt != want and not (_castable(dt) and t.dtype.is_float):
            raise CheckpointError(
                f"{t.name} has dtype {dt} in {src.where(t.name)}, expected {want}"
                + (
                    " (an FP8 checkpoint needs its quantization recipe in the spec)"
                    if dt.startswith("F8")
                    else ""
                )
            )


def _castable(safetensors_dtype: str) -> bool:
    d = DType.from_safetensors(safetensors_dtype)
    return d is not None and d.is_float


def _target_dtype(t: HFTensor, model_dtype: DType, requested: torch.dtype | None) -> torch.dtype:
    # The router bias selects experts by small margins: always fp32, whatever the model dtype.
    if requested is None or t.role is ParamRole.ROUTER_BIAS or t.dtype is not model_dtype:
        return TORCH_DTYPES[t.dtype]
    return requested


def _mtp_hint(graph: Graph, missing: list[str], unexpected: list[str]) -> str:
    n_layers, n_mtp = graph.attrs.num_layers, graph.attrs.num_mtp_layers
    if missing and all(hf_layer(n) >= n_layers for n in missing):
        return f" (the spec has num_mtp_layers={n_mtp}; does the checkpoint have MTP layers?)"
    if unexpected and all(hf_layer(n) >= n_layers for n in unexpected):
        return f" (the spec has num_mtp_layers={n_mtp}; the checkpoint has more MTP layers)"
    return ""


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _fmt(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
