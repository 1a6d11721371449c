"""Small helpers shared by the kernel modules. Importing this never imports triton or cutlass."""

from __future__ import annotations

import importlib.util
import os

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int, floor: int = 1) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def cutlass_available() -> bool:
    return importlib.util.find_spec("cutlass") is not None


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


# ---- shared by a reference module and its Triton launcher ----------------------------------
# They live here, not in the reference module, so the launcher (imported lazily by the
# reference) does not import the reference back: no import cycle.

# Block-scaled FP8 (kernels/fp8.py): E4M3 values, 128-wide blocks, scale_inv = max(amax, eps) / 448.
BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_EPS = 1e-12


def align_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static row bound of the padded expert-major layout (a multiple of block_m)."""
    # At most min(E, N) experts are non-empty and each pads by under block_m rows. sym_min keeps
    # symbolic sizes symbolic under torch.compile(dynamic=True) instead of guarding on them.
    nonempty = torch.sym_min(num_experts, num_pairs)
    return (num_pairs + nonempty * (block_m - 1)) // block_m * block_m


def route_launch_shape(num_experts: int, n_group: int) -> tuple[int, int]:
    """Padded (groups, experts per group) of the router kernel's score tile; both powers of two."""
    per = num_experts // n_group
    return next_pow2(n_group), next_pow2(per, floor=max(1, cdiv(16, next_pow2(n_group))))
