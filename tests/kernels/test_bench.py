"""bench/kernels.py runs: it refuses clearly without CUDA, and its CPU smoke mode passes."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_it_says_so():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "needs CUDA" in out.stderr and "--cpu-smoke" in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_cpu_smoke_checks_every_kernel():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--tokens", "5"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("router", "moe_align", "fused MoE fwd", "fused MoE fwd+bwd", "fp8 GEMM", "fp8 grouped GEMM"):
        assert name in out.stdout
    assert "all 7 checks passed" in out.stdout
