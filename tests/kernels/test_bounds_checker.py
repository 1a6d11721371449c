"""The interpreter bounds checker (tests/triton_bounds.py) must catch an out-of-bounds store
before it happens and stay silent on a correctly masked one."""

import os

import pytest
import torch
import triton_bounds  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not triton_bounds.installed(),
    reason="checks the interpreter's bounds checker (off without TRITON_INTERPRET=1 or with GLMC_TRITON_BOUNDS=0)",
)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)
    else:
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n))


def test_masked_copy_passes() -> None:
    src = torch.arange(5, dtype=torch.float32)
    dst = torch.zeros(5)
    _copy[(1,)](src, dst, 5, BLOCK=8, MASKED=True)
    assert torch.equal(dst, src)


def test_unmasked_store_past_the_end_is_caught_before_it_writes() -> None:
    backing = torch.full((16,), -1.0)
    src = torch.arange(5, dtype=torch.float32)
    dst = backing[:5]  # the view ends at 5 elements; its storage goes on to 16
    with pytest.raises(Exception, match=r"store touches 3 address\(es\) outside every tensor argument"):
        _copy[(1,)](src, dst, 5, BLOCK=8, MASKED=False)
    assert torch.equal(backing, torch.full((16,), -1.0))  # refused before anything was written
