"""How the bundle maps glmc's `shard{ep,tp,pp}` plan onto TensorRT-LLM's parallel sizes, and the
checks TensorRT-LLM would otherwise fail at load on the GPUs.

TensorRT-LLM's rules (`tensorrt_llm/mapping.py`, `_torch/modules/attention.py`,
`_torch/models/modeling_glm.py`, main 2025-26):
- `tensor_parallel_size` GPUs per pipeline stage; the experts split them as
  `moe_tensor_parallel_size x moe_expert_parallel_size`, which must equal it.
- Attention is split over all `tensor_parallel_size` GPUs (each takes num_heads / tp query heads,
  which must divide; ceil(num_kv_heads / tp) KV heads, duplicated when there are fewer KV heads
  than GPUs), or, with `enable_attention_dp`, not split at all (every GPU runs whole attention on
  its own requests). There is no attention split over a subset of the GPUs.
- Experts: each of the moe_ep ranks holds num_experts / moe_ep experts (must divide); moe_tp
  splits each expert's intermediate size.

glmc's plan splits attention over `tp` with `ep` acting as data parallel for it, so: tp = 1 is
exactly attention-DP; tp > 1 with ep > 1 becomes attention TP over all ep x tp GPUs when the heads
divide that, and otherwise attention-DP, the only valid mapping (said in a warning and in the
options file).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from glmc.ir import GlmcError


@dataclass(frozen=True)
class Mapping:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    moe_expert_parallel_size: int
    moe_tensor_parallel_size: int
    enable_attention_dp: bool
    attention: str  # how attention is split, in words (the options file's header says it)


def attention_split_problem(num_heads: int, num_kv_heads: int, degree: int) -> str | None:
    """Why TensorRT-LLM cannot split this attention over `degree` GPUs (None when it can)."""
    if num_heads % degree:
        return f"{num_heads} attention heads do not divide by {degree}"
    if num_kv_heads % degree and degree % num_kv_heads:
        return f"{num_kv_heads} KV heads neither divide by {degree} nor divide it (no even duplication)"
    return None


def plan_mapping(
    *,
    ep: int,
    tp: int,
    pp: int,
    num_heads: int,
    num_kv_heads: int,
    num_experts: int,
    moe_intermediate_size: int,
) -> Mapping:
    """TensorRT-LLM's sizes for glmc's mesh; GlmcError naming the degree when none is valid."""
    world = ep * tp
    if num_experts and num_experts % ep:
        raise GlmcError(
            f"trtllm: moe_expert_parallel_size={ep} (shard ep) does not divide the {num_experts} routed experts"
        )
    if num_experts and moe_intermediate_size % tp:
        raise GlmcError(
            f"trtllm: moe_tensor_parallel_size={tp} (shard tp) does not divide the experts' intermediate "
            f"size {moe_intermediate_size}"
        )
    if world == 1:
        attention_dp, how = False, "whole on one GPU per stage"
    elif tp == 1:
        attention_dp, how = (
            True,
            f"data parallel: every one of the {world} GPUs runs whole attention (ep={ep})",
        )
    else:
        problem = attention_split_problem(num_heads, num_kv_heads, world)
        if problem is None:
            attention_dp = False
            how = (
                f"tensor parallel over all {world} GPUs (ep={ep} x tp={tp}): TensorRT-LLM has no attention split "
                f"over tp={tp} alone"
            )
        else:
            attention_dp = True
            how = (
                f"data parallel (enable_attention_dp): {problem}, the tensor_parallel_size (ep={ep} x tp={tp}) "
                "TensorRT-LLM splits attention over otherwise"
            )
            warnings.warn(
                f"trtllm: {problem} = tensor_parallel_size (ep={ep} x tp={tp}), the degree TensorRT-LLM splits "
                f"attention over; writing enable_attention_dp: true, the only valid mapping (whole attention on "
                f"each GPU, experts over moe_ep={ep} x moe_tp={tp})",
                stacklevel=2,
            )
    return Mapping(
        tensor_parallel_size=world,
        pipeline_parallel_size=pp,
        moe_expert_parallel_size=ep,
        moe_tensor_parallel_size=tp,
        enable_attention_dp=attention_dp,
        attention=how,
    )
