"""The torch target's MoE seam. Routing and the expert GEMMs come from `glmc.kernels.dispatch`,
which picks the backend: fused Triton (or CUTLASS) kernels on CUDA, the compiled-torch path
(counting-sort align + grouped GEMM) on CPU; `GLMC_KERNELS` / `use_kernels` force one."""

from glmc.kernels.dispatch import fp8_moe_experts, moe_experts, route

__all__ = ["fp8_moe_experts", "moe_experts", "route"]
