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
