"""Kernels for the hot paths, each beside a plain-torch `*_ref`, exposed as `torch.library` custom
ops in the `glmc` namespace. Depends on torch (and optionally triton/cutlass); never on glmc.ir.

Importing this package imports neither triton nor cutlass: kernel modules load on first use.
The torch target calls the seam in `dispatch` (route, moe_experts, fp8_*)."""

from .dispatch import (
    BACKENDS,
    backend_for,
    fp8_gemm,
    fp8_grouped_gemm,
    fp8_linear,
    moe_experts,
    quantize_act,
    quantize_weight,
    requested_kernels,
    route,
    set_kernels,
    use_kernels,
)
from .fp8 import (
    dequantize_act_ref,
    dequantize_weight_ref,
    fp8_gemm_ref,
    fp8_grouped_gemm_ref,
    quantize_act_ref,
    quantize_weight_ref,
)
from .fused_moe import moe_experts_ref, moe_experts_torch
from .grouped_mm import grouped_mm, grouped_mm_ref
from .moe_align import Alignment, align_capacity, moe_align_ref, moe_align_torch
from .router import route_ref

__all__ = [
    "BACKENDS",
    "Alignment",
    "align_capacity",
    "backend_for",
    "dequantize_act_ref",
    "dequantize_weight_ref",
    "fp8_gemm",
    "fp8_gemm_ref",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_ref",
    "fp8_linear",
    "grouped_mm",
    "grouped_mm_ref",
    "moe_align_ref",
    "moe_align_torch",
    "moe_experts",
    "moe_experts_ref",
    "moe_experts_torch",
    "quantize_act",
    "quantize_act_ref",
    "quantize_weight",
    "quantize_weight_ref",
    "requested_kernels",
    "route",
    "route_ref",
    "set_kernels",
    "use_kernels",
]
