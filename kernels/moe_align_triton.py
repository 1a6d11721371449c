# mypy: disable-error-code="no-untyped-def"
"""Triton counting sort behind `glmc::moe_align` (see moe_align.py for the layout).

Three passes over CHUNK-sized slices of the N pairs, O(N * CHUNK + (N / CHUNK) * E) work:
1. per chunk: each pair's rank among equal experts earlier in the chunk, and the chunk histogram;
2. one program: exclusive scan of the histograms over chunks (each chunk's base inside every
   expert's segment), expert counts, block-padded offsets;
3. per chunk: scatter each pair to offsets[e] + base[chunk, e] + rank; per block: its expert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import align_capacity, cdiv, next_pow2


@triton.jit
def _rank_hist_kernel(ids_ptr, rank_ptr, hist_ptr, N, E, CHUNK: tl.constexpr, EP: tl.constexpr):
    c = tl.program_id(0)
    i = c * CHUNK + tl.arange(0, CHUNK)
    m = i < N
    e = tl.load(ids_ptr + i, mask=m, other=-1).to(tl.int32)
    same = (e[:, None] == e[None, :]) & (tl.arange(0, CHUNK)[None, :] < tl.arange(0, CHUNK)[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    tl.store(rank_ptr + i, rank, mask=m)
    hist = tl.sum((e[:, None] == tl.arange(0, EP)[None, :]).to(tl.int32), axis=0)
    ecol = tl.arange(0, EP)
    tl.store(hist_ptr + c * E + ecol, hist, mask=ecol < E)


@triton.jit
def _scan_kernel(
    hist_ptr,
    base_ptr,
    offsets_ptr,
    counts_ptr,
    n_chunks,
    E,
    BLOCK_M: tl.constexpr,
    BC: tl.constexpr,
    EP: tl.constexpr,
):
    ecol = tl.arange(0, EP)
    em = ecol < E
    running = tl.zeros([EP], dtype=tl.int32)
    for c0 in range(0, n_chunks, BC):
        cr = c0 + tl.arange(0, BC)
        mask = (cr[:, None] < n_chunks) & em[None, :]
        h = tl.load(hist_ptr + cr[:, None] * E + ecol[None, :], mask=mask, other=0)
        incl = tl.cumsum(h, axis=0)
        tl.store(base_ptr + cr[:, None] * E + ecol[None, :], incl - h + running[None, :], mask=mask)
        running += tl.sum(h, axis=0)
    tl.store(counts_ptr + ecol, running, mask=em)
    padded = (running + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(offsets_ptr + 1 + ecol, ends, mask=em)
    tl.store(offsets_ptr + ecol, ends - padded, mask=ecol == 0)


@triton.jit
def _scatter_kernel(
    ids_ptr,
    rank_ptr,
    base_ptr,
    offsets_ptr,
    sorted_ptr,
    block_expert_ptr,
    N,
    E,
    n_blocks,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    EP: tl.constexpr,
):
    c = tl.program_id(0)
    i = c * CHUNK + tl.arange(0, CHUNK)
    m = i < N
    e = tl.load(ids_ptr + i, mask=m, other=0).to(tl.int32)
    rank = tl.load(rank_ptr + i, mask=m, other=0)
    base = tl.load(base_ptr + c * E + e, mask=m, other=0)
    start = tl.load(offsets_ptr + e, mask=m, other=0)
    tl.store(sorted_ptr + start + base + rank, i.to(tl.int32), mask=m)
    # Block b's expert: the number of padded segment ends at or before its first row.
    b = c * CHUNK + tl.arange(0, CHUNK)
    ecol = tl.arange(0, EP)
    ends = tl.load(offsets_ptr + 1 + ecol, mask=ecol < E, other=2147483647)
    used = tl.load(offsets_ptr + E)
    row = b * BLOCK_M
    expert = tl.sum((ends[None, :] <= row[:, None]).to(tl.int32), axis=1)
    expert = tl.where(row < used, expert, -1)
    tl.store(block_expert_ptr + b, expert, mask=b < n_blocks)


def launch_moe_align(ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    flat = ids.reshape(-1).contiguous()
    n = flat.numel()
    dev = ids.device
    capacity = align_capacity(n, num_experts, block_m)
    n_blocks = capacity // block_m
    i32 = torch.int32
    sorted_ids = torch.full((capacity,), n, device=dev, dtype=i32)
    block_expert = torch.empty(n_blocks, device=dev, dtype=i32)
    offsets = torch.empty(num_experts + 1, device=dev, dtype=i32)
    counts = torch.empty(num_experts, device=dev, dtype=i32)
    chunk = 128
    n_chunks = max(cdiv(n, chunk), 1)
    ep = next_pow2(num_experts + 1, floor=16)
    rank = torch.empty(max(n, 1), device=dev, dtype=i32)
    hist = torch.empty(n_chunks, num_experts, device=dev, dtype=i32)
    base = torch.empty_like(hist)
    _rank_hist_kernel[(n_chunks,)](flat, rank, hist, n, num_experts, CHUNK=chunk, EP=ep)
    _scan_kernel[(1,)](hist, base, offsets, counts, n_chunks, num_experts, BLOCK_M=block_m, BC=32, EP=ep)
    grid = max(n_chunks, cdiv(n_blocks, chunk), 1)
    _scatter_kernel[(grid,)](
        flat,
        rank,
        base,
        offsets,
        sorted_ids,
        block_expert,
        n,
        num_experts,
        n_blocks,
        BLOCK_M=block_m,
        CHUNK=chunk,
        EP=ep,
    )
    return sorted_ids, block_expert, offsets, counts
