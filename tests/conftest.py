"""Suite-wide test settings: CPU-friendly compile, Triton's interpreter without a GPU, and the
`gpu` marker skipping cleanly where no CUDA device exists."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Two cores: inductor's compile-worker pool only competes with the test itself.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# TRITON_INTERPRET is read when a kernel module is first imported; set it before any test can.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("GLMC_TRITON_BOUNDS", "1") != "0":
    # Every interpreted load/store/atomic must stay inside its launch's tensors (the CPU stand-in
    # for compute-sanitizer): an out-of-bounds access fails the test instead of corrupting memory.
    from triton_bounds import install  # tests/ is on sys.path (rootdir conftest)

    install()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
