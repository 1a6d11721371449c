"""Kernel tests run the Triton kernels on CPU through the interpreter when there is no GPU.

TRITON_INTERPRET is read when `@triton.jit` runs, i.e. when a kernel module is first imported;
glmc.kernels imports those lazily, so setting it here (before any test runs a kernel) is enough.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernels run: the GPU if there is one, else the CPU interpreter. Tests that
    take this fixture run Triton kernels and skip when triton is not installed."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install glmc[triton])")
    return torch.device("cuda" if HAS_CUDA else "cpu")
