"""TensorRT-LLM's parallel sizes, translated from the plan the shard pass recorded on the graph
(its mesh pp x dp x ep x tp and every parameter's ShardSpecs).

Every divisibility rule of the plan (heads, KV heads, MLP/expert widths, vocabulary by tp;
expert slots by ep; stages by pp) is the pass's (`glmc/passes/shard.py`) and ran when the
pipeline ran. This module checks only TensorRT-LLM's own constraints, where its mapping is not
the plan's, naming the degree.

TensorRT-LLM's mapping (`tensorrt_llm/mapping.py`, `_torch/modules/attention.py`,
`_torch/modules/fused_moe/`, main 2025-26):
- `tensor_parallel_size` GPUs per pipeline stage; the experts split them as
  `moe_tensor_parallel_size x moe_expert_parallel_size`, which must equal it.
- Attention is split over all `tensor_parallel_size` GPUs (num_heads / tp query heads each,
  which must divide; ceil(num_kv_heads / tp) KV heads, duplicated when there are fewer KV heads
  than GPUs), or, with `enable_attention_dp`, not split at all (every GPU runs whole attention on
  its own requests). There is no attention split over a subset of the GPUs.
- Experts: moe_ep rank r holds experts [r E/moe_ep, (r+1) E/moe_ep) (`Mapping.ep_experts`; E
  must divide); moe_tp splits each expert's intermediate size.
- Layers: pipeline rank p holds the p-th of `pipeline_parallel_size` even chunks of the trunk
  (`Mapping.pp_layers`: torch.tensor_split, the first ranks take one more).
- One launch serves one copy of the model.

The translation, per plan:
- One copy of the model per pipeline stage is the plan's ep x tp ranks: tensor_parallel_size =
  ep x tp, moe_expert_parallel_size = ep, moe_tensor_parallel_size = tp (the experts' ep slot
  map and tp columns), pipeline_parallel_size = pp. The plan's dp (whole-model replicas) is dp
  launches of the bundle.
- Attention: the plan splits it over tp (heads, KV heads replicated above num_kv_heads) and runs
  it data parallel over ep. tp = 1 is TensorRT-LLM's attention-DP; ep = 1 is its attention TP
  over tp; with both > 1 TensorRT-LLM splits attention over all ep x tp GPUs, which its own rule
  allows only when the heads divide that, and otherwise attention-DP is the only valid mapping
  (said in a warning and in the options file).
- Experts: the plan's contiguous slot map is TensorRT-LLM's. A load-aware map (`expert_load`) or
  redundant replicas (`redundant_experts`) are not written (TensorRT-LLM places experts
  contiguously; a warning says so), so the routed experts themselves must divide ep there.
- Stages: where the plan's FLOP-balanced stages differ from TensorRT-LLM's even split, the
  options file says both.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from glmc.ir import AttentionAttrs, ExpertsAttrs, GlmcError, Graph, Op, ParamRole, mesh_of, shard_specs


@dataclass(frozen=True)
class Mapping:
    """TensorRT-LLM's parallel sizes for one launch (the default: one GPU)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    moe_expert_parallel_size: int = 1
    moe_tensor_parallel_size: int = 1
    enable_attention_dp: bool = False
    attention: str = "whole on one GPU per stage"  # how attention is split, in words
    notes: tuple[str, ...] = ()  # where the served layout is not the plan's, in words
    launches: int = 1  # copies of the server the plan asks for (its dp)

    def __post_init__(self) -> None:
        # TensorRT-LLM's Mapping refuses anything else at start; plan_mapping never builds it.
        sizes = (self.tensor_parallel_size, self.pipeline_parallel_size, self.moe_expert_parallel_size)
        if min(*sizes, self.moe_tensor_parallel_size, self.launches) < 1:
            raise ValueError(f"parallel sizes must be positive: {self}")
        if self.moe_expert_parallel_size * self.moe_tensor_parallel_size != self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} must equal moe_expert_parallel_size x "
                f"moe_tensor_parallel_size = {self.moe_expert_parallel_size} x {self.moe_tensor_parallel_size}"
            )


def attention_split_problem(num_heads: int, num_kv_heads: int, degree: int) -> str | None:
    """Why TensorRT-LLM cannot split this attention over `degree` GPUs (None when it can)."""
    if num_heads % degree:
        return f"{num_heads} attention heads do not divide by {degree}"
    if num_kv_heads % degree and degree % num_kv_heads:
        return f"{num_kv_heads} KV heads neither divide by {degree} nor divide it (no even duplication)"
    return None


def plan_mapping(graph: Graph) -> Mapping:
    """TensorRT-LLM's sizes for the plan on `graph`; GlmcError naming the degree where
    TensorRT-LLM cannot serve it."""
    mesh = mesh_of(graph)
    ep, tp, pp, dp = mesh["ep"], mesh["tp"], mesh["pp"], mesh["dp"]
    notes = [*_expert_notes(graph, ep), *_stage_notes(graph, pp)]
    if dp > 1:
        notes.append(
            f"the plan's dp={dp} is {dp} launches of this bundle, each on {ep * tp * pp} GPUs "
            "(TensorRT-LLM serves one copy of the model per launch)"
        )
    attention_dp, how = _attention(graph, ep, tp)
    return Mapping(
        tensor_parallel_size=ep * tp,
        pipeline_parallel_size=pp,
        moe_expert_parallel_size=ep,
        moe_tensor_parallel_size=tp,
        enable_attention_dp=attention_dp,
        attention=how,
        notes=tuple(notes),
        launches=dp,
    )


def _attention(graph: Graph, ep: int, tp: int) -> tuple[bool, str]:
    node = graph.find(Op.ATTENTION)[0]
    q = next(p for p in node.params if p.name.startswith(("q_proj.", "qkv_proj.")))
    split = next((sp for sp in shard_specs(q) if sp.axis == "tp"), None)
    heads = tp if split is not None else 1  # the plan's attention split (its heads over tp)
    if ep * tp == 1:
        return False, "whole on one GPU per stage"
    if heads == 1:
        return (
            True,
            f"data parallel: every one of the {ep} GPUs runs whole attention (ep={ep}), as the plan does",
        )
    if ep == 1:
        return False, f"tensor parallel over tp={tp}, the plan's split"
    attn = AttentionAttrs.of(node)
    problem = attention_split_problem(attn.num_heads, attn.num_kv_heads, ep * tp)
    if problem is None:
        return False, (
            f"tensor parallel over all {ep * tp} GPUs (ep={ep} x tp={tp}): TensorRT-LLM has no attention split "
            f"over tp={tp} alone"
        )
    warnings.warn(
        f"trtllm: {problem} = tensor_parallel_size (ep={ep} x tp={tp}), the degree TensorRT-LLM splits "
        f"attention over; writing enable_attention_dp: true, the only valid mapping (whole attention on "
        f"each GPU, experts over moe_ep={ep} x moe_tp={tp})",
        stacklevel=3,
    )
    return True, (
        f"data parallel (enable_attention_dp): {problem}, the tensor_parallel_size (ep={ep} x tp={tp}) "
        "TensorRT-LLM splits attention over otherwise"
    )


def _expert_notes(graph: Graph, ep: int) -> list[str]:
    """The plan's expert slot maps against TensorRT-LLM's contiguous placement."""
    node = next((n for n in graph.nodes if n.op in (Op.EXPERTS, Op.MOE)), None)
    if node is None or ep == 1:
        return []
    e = ExpertsAttrs.of(node).num_experts
    maps = {
        sp.index
        for n in graph.nodes
        for p in n.params
        if p.role is ParamRole.EXPERT
        for sp in shard_specs(p)
        if sp.axis == "ep"
    }
    if not maps:  # the pass gives every expert parameter an ep spec when ep > 1
        return []
    slots = max(sum(len(r) for r in m) for m in maps)
    contiguous = tuple(tuple(range(r * e // ep, (r + 1) * e // ep)) for r in range(ep))
    if slots == e and maps <= {contiguous}:
        return []
    what = f"redundant_experts={slots - e} replicas ({slots} slots)" if slots > e else "load-aware expert map"
    if e % ep:
        divisors = [d for d in range(1, e + 1) if e % d == 0]
        raise GlmcError(
            f"trtllm: moe_expert_parallel_size={ep} (shard ep) does not divide the {e} routed experts: "
            f"TensorRT-LLM places num_experts / moe_expert_parallel_size experts per GPU and the bundle does "
            f"not carry the plan's {what}; use ep in {divisors}"
        )
    warnings.warn(
        f"trtllm: the plan's {what} is not written: TensorRT-LLM places the {e} experts contiguously, "
        f"{e // ep} per moe_ep rank (ep={ep})",
        stacklevel=3,
    )
    return [f"experts: contiguous, {e // ep} per moe_ep rank; the plan's {what} is not carried"]


def _stage_notes(graph: Graph, pp: int) -> list[str]:
    if pp == 1:
        return []
    n = graph.attrs.num_layers
    even, start = [], 0
    for p in range(pp):  # torch.tensor_split's chunks: the first n % pp take one more
        size = n // pp + (1 if p < n % pp else 0)
        even.append((start, start + size - 1))
        start += size
    planned = list(graph.attrs.pp_stages)
    if planned == even:
        return []

    def text(stages: list[tuple[int, int]]) -> str:
        return ", ".join(f"{a}-{b}" for a, b in stages)

    return [
        f"layers: TensorRT-LLM splits the {n} layers evenly over pp={pp} ({text(even)}), not as the plan's "
        f"FLOP-balanced stages ({text(planned)})"
    ]
