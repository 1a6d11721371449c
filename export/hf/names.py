"""The Hugging Face checkpoint layout of a graph: which tensors a `Glm4MoeForCausalLM` checkpoint
holds, and which IR parameter (or slice of one) each comes from. Torch-free.

Three things differ from the IR (whose full parameter names are the in-memory state-dict keys):
- routed experts are stacked in memory (`experts.gate_up_proj` [E, 2I, H], gate rows first;
  `experts.down_proj` [E, H, I]) but stored per expert on disk (`experts.{e}.gate_proj.weight`
  ...), because SGLang and transformers 4.5x only know the per-expert names;
- MTP layer k is `model.mtp.{k}` in memory and `model.layers.{num_layers + k}` on disk;
- the MTP layer's `embed_tokens` / `shared_head.head` are checkpoint copies of the main
  embedding / head (older vLLM reads them), and a tied `lm_head` is not written at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from glmc.ir import DType, Graph, Node, Op, Param, ParamRole
from glmc.ir.naming import hf_name


class Part(Enum):
    """Which part of its IR parameter a checkpoint tensor holds."""

    WHOLE = "whole"
    EXPERT_GATE = "gate"  # gate_up_proj[e, :I]
    EXPERT_UP = "up"  # gate_up_proj[e, I:]
    EXPERT_DOWN = "down"  # down_proj[e]


@dataclass(frozen=True)
class HFTensor:
    """One tensor of the checkpoint and where it comes from in memory."""

    name: str  # the checkpoint name
    shape: tuple[int, ...]  # the checkpoint shape
    dtype: DType
    role: ParamRole
    param: str  # full IR name of the in-memory tensor it is read from / stored into
    param_shape: tuple[int, ...]
    part: Part = Part.WHOLE
    expert: int = 0
    copy: bool = False  # a checkpoint-only copy of `param` (MTP embed/head); optional on read

    @property
    def safetensors_dtype(self) -> str:
        return self.dtype.safetensors


def hf_tensors(graph: Graph) -> list[HFTensor]:
    """Every checkpoint tensor of `graph`, in graph order (experts: per expert gate, up, down)."""
    n_layers = int(graph.attr("num_layers"))
    params = {fqn: p for fqn, _, p in graph.params()}
    out: list[HFTensor] = []
    for node in graph.nodes:
        if node.op is Op.EXPERTS:
            out += _expert_tensors(graph, node, n_layers)
            continue
        for p in node.params:
            if not p.attr("checkpoint", True):
                continue
            fqn = f"{node.name}.{p.name}"
            out.append(
                HFTensor(
                    name=hf_name(fqn, n_layers),
                    shape=p.shape,
                    dtype=p.dtype,
                    role=p.role,
                    param=resolve_tie(params, fqn),
                    param_shape=p.shape,
                    copy=p.tied_to is not None,
                )
            )
    return out


def hf_tensor_layout(graph: Graph) -> dict[str, tuple[tuple[int, ...], str]]:
    """Checkpoint name -> (shape, safetensors dtype) for every tensor the checkpoint holds."""
    return {t.name: (t.shape, t.safetensors_dtype) for t in hf_tensors(graph)}


def resolve_tie(params: dict[str, Param], fqn: str) -> str:
    """Follow `tied_to` to the parameter that owns the storage (ties may chain)."""
    seen = {fqn}
    while (tied := params[fqn].tied_to) is not None:
        if tied not in params:
            raise ValueError(f"{fqn} is tied to {tied}, which is not a parameter of the graph")
        if tied in seen:
            raise ValueError(f"parameter ties form a cycle through {tied}")
        seen.add(tied)
        fqn = tied
    return fqn


def _expert_tensors(graph: Graph, node: Node, n_layers: int) -> list[HFTensor]:
    names = {p.name for p in node.params}
    if names != {"gate_up_proj", "down_proj"}:
        raise ValueError(
            f"the Hugging Face layout stores experts node {node.name} as gate_up_proj and down_proj only; "
            f"it has parameters {sorted(names)}"
        )
    gate_up, down = node.param("gate_up_proj"), node.param("down_proj")
    n_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    prefix = hf_name(node.name, n_layers)
    gu_name, down_name = f"{node.name}.gate_up_proj", f"{node.name}.down_proj"
    out: list[HFTensor] = []
    for e in range(n_experts):
        for proj, part in (("gate_proj", Part.EXPERT_GATE), ("up_proj", Part.EXPERT_UP)):
            out.append(
                HFTensor(
                    f"{prefix}.{e}.{proj}.weight", (inter, hidden), gate_up.dtype, gate_up.role,
                    gu_name, gate_up.shape, part, e,
                )
            )  # fmt: skip
        out.append(
            HFTensor(
                f"{prefix}.{e}.down_proj.weight", (hidden, inter), down.dtype, down.role,
                down_name, down.shape, Part.EXPERT_DOWN, e,
            )
        )  # fmt: skip
    return out
