"""moe_align: the Triton counting sort and the torch counting sort equal the argsort reference
exactly, and the reference has the documented layout."""

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glmc.kernels import align_capacity, moe_align_ref, moe_align_torch
from glmc.kernels.moe_align import moe_align_triton

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ids(tokens, experts, top_k, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    if skew:  # few hot experts, many empty ones
        scores = torch.rand(tokens, experts, generator=g) + torch.linspace(3, 0, experts) ** 4
    else:
        scores = torch.rand(tokens, experts, generator=g)
    return scores.topk(top_k, dim=-1).indices


def check_layout(al, ids, experts, block_m):
    n = ids.numel()
    flat = ids.reshape(-1).cpu()
    s, be, off, cnt = (t.cpu() for t in al)
    assert s.dtype == be.dtype == off.dtype == cnt.dtype == torch.int32
    assert s.numel() == align_capacity(n, experts, block_m) and s.numel() % max(block_m, 1) == 0
    assert torch.equal(cnt, torch.bincount(flat, minlength=experts).int())
    assert off[0] == 0 and bool((off[1:] - off[:-1] >= cnt).all()) and bool((off % block_m == 0).all())
    assert off[-1] <= s.numel()
    real = s[s < n]
    assert torch.equal(real.sort().values, torch.arange(n, dtype=torch.int32)), "each pair exactly once"
    for e in range(experts):
        seg = s[off[e] : off[e + 1]]
        head, pad = seg[: cnt[e]], seg[cnt[e] :]
        assert bool((flat[head.long()] == e).all()) and bool((head[1:] > head[:-1]).all())
        assert bool((pad == n).all())
        assert bool((be[off[e] // block_m : off[e + 1] // block_m] == e).all())
    assert bool((s[off[-1] :] == n).all()) and bool((be[off[-1] // block_m :] == -1).all())


@settings(deadline=None)  # examples: the profile in tests/conftest.py
@given(
    tokens=st.sampled_from([0, 1, 2, 7, 33, 130, 300]),
    experts=st.integers(1, 40),
    top_k=st.integers(1, 8),
    block_m=st.sampled_from([1, 4, 16, 64]),
    skew=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_counting_sorts_equal_reference(tokens, experts, top_k, block_m, skew, seed):
    top_k = min(top_k, experts)
    ids = _ids(tokens, experts, top_k, seed, skew)
    ref = moe_align_ref(ids, experts, block_m)
    check_layout(ref, ids, experts, block_m)
    candidates = [moe_align_torch(ids, experts, block_m)]
    if HAS_TRITON:
        candidates.append(moe_align_triton(ids.to(TRITON_DEVICE), experts, block_m))
    for got in candidates:
        for name, a, b in zip(ref._fields, got, ref, strict=True):
            assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m"),
    [(1, 8, 2, 16), (5, 6, 6, 4), (257, 3, 1, 128), (0, 4, 2, 16), (64, 160, 8, 16)],
)
def test_edge_shapes(tokens, experts, top_k, block_m, device):
    ids = _ids(tokens, experts, top_k, 0)
    ref = moe_align_ref(ids, experts, block_m)
    check_layout(ref, ids, experts, block_m)
    got = moe_align_triton(ids.to(device), experts, block_m)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, ref, strict=True))


def test_all_pairs_on_one_expert_leave_the_others_empty(device):
    ids = torch.full((37, 1), 2)
    ref = moe_align_ref(ids, 5, 8)
    assert ref.counts.tolist() == [0, 0, 37, 0, 0] and ref.offsets.tolist() == [0, 0, 0, 40, 40, 40]
    got = moe_align_triton(ids.to(device), 5, 8)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, ref, strict=True))


def test_capacity_bound_is_tight_enough():
    assert align_capacity(16, 160, 1) == 16
    assert align_capacity(8, 160, 16) == 8 * 16  # decode: at most one padded block per pair
    assert align_capacity(4096 * 8, 160, 64) == (4096 * 8 + 160 * 63) // 64 * 64
