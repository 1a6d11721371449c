"""Kernels for the hot paths, each beside a plain-torch `*_ref`, exposed as `torch.library` custom
ops in the `glmc` namespace. Depends on torch (and optionally triton/cutlass); never on glmc.ir.

Importing this package imports neither triton nor cutlass: kernel modules load on first use.
The torch target calls the seam in `dispatch` (route, moe_experts, fp8_*)."""

if __name__ == "glmc.kernels":
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
else:
    # This folder is also importable as a top-level `kernels` whenever the repository root is on
    # sys.path (`python -m pytest` or any script run from the root), and `kernels` is a real
    # package name: transformers' `is_kernels_available()` imports it when it finds no installed
    # metadata. Executing the kernel modules a second time would define every `glmc::` op again,
    # and torch then destroys the first registration while `glmc.kernels` still calls it (a
    # use-after-free in the dispatcher, see README). So under any other name this package stays
    # an empty stub: no submodules can be imported through it and nothing is registered.
    __path__ = []  # a package without a search path has no submodules

    def __getattr__(name: str) -> object:
        raise AttributeError(
            f"module {__name__!r} is glmc's source folder imported under a foreign name and stays "
            f"empty (no {name!r}); import glmc.kernels instead"
        )
