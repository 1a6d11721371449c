"""The plain Hugging Face checkpoint of a graph in memory terms: for each checkpoint tensor
(from layout.py, the one layout engine), the IR parameter it is stored from and where in that
parameter its elements lie. Torch-free. `to_hf` / `from_hf` (weights.py) read this.

The layout engine decides everything about the checkpoint (names, shapes, per-expert split,
MTP renaming and copies, an omitted tied head); this module adds what a state dict needs:
- the parameter a tensor is read from / stored into, ties followed (an MTP copy reads its owner);
- the flat element offset of the tensor in that parameter: an unsharded parameter is the
  C-order concatenation of its checkpoint tensors (a stacked `experts.gate_up_proj` [E, 2I, H]
  is expert 0's gate, its up, expert 1's gate, ...);
- transformers' tensor order for experts: per expert gate, up, down (the layout lists a
  parameter's tensors together), so plain checkpoints keep the order they always had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from glmc.ir import DType, Graph, Op, Param, ParamRole

from .layout import OutTensor, plan_checkpoint, resolve_tie


@dataclass(frozen=True)
class HFTensor:
    """One tensor of the checkpoint and where it comes from in memory."""

    name: str  # the checkpoint name
    shape: tuple[int, ...]  # the checkpoint shape
    dtype: DType
    role: ParamRole
    param: str  # full IR name of the in-memory tensor it is read from / stored into
    param_shape: tuple[int, ...]
    offset: int = 0  # flat element offset of this tensor in `param`
    copy: bool = False  # a checkpoint-only copy of `param` (MTP embed/head); optional on read

    @property
    def safetensors_dtype(self) -> str:
        return self.dtype.safetensors

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def whole(self) -> bool:
        """Whether the tensor is its parameter as a whole (not one expert's part of it)."""
        return self.shape == self.param_shape


def hf_tensors(graph: Graph) -> list[HFTensor]:
    """Every checkpoint tensor of an unquantised, unsharded `graph`, in graph order (experts:
    per expert gate, up, down)."""
    for attr, present in (
        ("quantization", graph.attrs.quantization is not None),
        ("mesh", bool(graph.attrs.mesh)),
    ):
        if present:
            raise ValueError(f"a state dict maps to the checkpoint of a graph without {attr}")
    params = {fqn: p for fqn, _, p in graph.params()}
    by_param: dict[str, list[OutTensor]] = {}
    for t in plan_checkpoint(graph):
        by_param.setdefault(t.param, []).append(t)
    out: list[HFTensor] = []
    for node in graph.nodes:
        runs = [
            _tensors(params, f"{node.name}.{p.name}", by_param.get(f"{node.name}.{p.name}", []))
            for p in node.params
        ]
        if node.op is not Op.EXPERTS:
            out += [t for run in runs for t in run]
            continue
        names = {p.name for p in node.params}
        if names != {"gate_up_proj", "down_proj"}:
            raise ValueError(
                f"the Hugging Face layout stores experts node {node.name} as gate_up_proj and down_proj only; "
                f"it has parameters {sorted(names)}"
            )
        n_experts = node.params[0].shape[0]
        per = [len(run) // n_experts for run in runs]
        for e in range(n_experts):
            for run, k in zip(runs, per, strict=True):
                out += run[e * k : (e + 1) * k]
    return out


def hf_tensor_layout(graph: Graph) -> dict[str, tuple[tuple[int, ...], str]]:
    """Checkpoint name -> (shape, safetensors dtype) for every tensor the checkpoint holds."""
    return {t.name: (t.shape, t.safetensors_dtype) for t in hf_tensors(graph)}


def _tensors(params: dict[str, Param], fqn: str, stored: list[OutTensor]) -> list[HFTensor]:
    p = params[fqn]
    owner = resolve_tie(params, fqn)
    out, offset = [], 0
    for t in stored:
        out.append(HFTensor(t.name, t.shape, t.dtype, t.role, owner, p.shape, offset, p.tied_to is not None))
        offset += out[-1].numel
    return out
