"""Kernels for the hot paths, each beside a plain-torch `*_ref`, exposed as `torch.library` custom
ops in the `glmc` namespace. Depends on torch (and optionally triton/cutlass); never on glmc.ir."""

from .grouped_mm import grouped_mm, grouped_mm_ref

__all__ = ["grouped_mm", "grouped_mm_ref"]
