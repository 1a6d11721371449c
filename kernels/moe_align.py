"""Align (token, expert) pairs into expert-major order: a counting sort, no argsort.

Pair i = t * top_k + j stands for token t's j-th expert ids[t, j]. The result:

- `sorted_ids` [capacity] int32: pair indices in expert-major order, stable within an expert (by
  pair index). Expert e owns rows offsets[e] .. offsets[e+1]; its first counts[e] rows are real,
  the rest (up to the next multiple of `block_m`) and every row past offsets[E] hold the
  sentinel N = T * top_k.
- `block_expert` [capacity // block_m] int32: the expert of each block of `block_m` rows, -1 for
  blocks past offsets[E]. GEMM kernels read one expert per row block.
- `offsets` [E + 1] int32: padded segment starts; offsets[E] is the number of rows in use.
- `counts` [E] int32: real pairs per expert.

`capacity` is a static bound (so compiled graphs have static shapes): the padded total is at
most N + min(E, N) * (block_m - 1), rounded down to whole blocks.

Three implementations give identical results: `moe_align_ref` (stable argsort, obviously right),
`moe_align_torch` (vectorised counting sort: chunk-local ranks, per-chunk histograms, an
exclusive scan over chunks; compiles fullgraph) and `glmc::moe_align` (the same counting sort in
Triton kernels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._common import align_capacity


class Alignment(NamedTuple):
    sorted_ids: Tensor
    block_expert: Tensor
    offsets: Tensor
    counts: Tensor


def _block_expert(offsets: Tensor, capacity: int, block_m: int) -> Tensor:
    starts = torch.arange(0, capacity, block_m, device=offsets.device, dtype=torch.int32)
    # The expert whose padded segment holds row `start` is the number of segment ends <= start.
    expert = torch.bucketize(starts, offsets[1:].contiguous(), right=True).to(torch.int32)
    return torch.where(starts < offsets[-1], expert, -1)


def moe_align_ref(ids: Tensor, num_experts: int, block_m: int) -> Alignment:
    """Reference: a stable argsort of the flattened expert ids."""
    flat = ids.reshape(-1).long()
    n = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.cat([counts.new_zeros(1), padded.cumsum(0)])
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    order = torch.sort(flat, stable=True).indices
    experts = flat[order]
    pos = offsets[experts] + (torch.arange(n, device=ids.device) - starts[experts])
    capacity = align_capacity(n, num_experts, block_m)
    sorted_ids = torch.full((capacity,), n, device=ids.device, dtype=torch.int32)
    sorted_ids[pos] = order.to(torch.int32)
    offsets32 = offsets.to(torch.int32)
    return Alignment(
        sorted_ids, _block_expert(offsets32, capacity, block_m), offsets32, counts.to(torch.int32)
    )


def moe_align_torch(ids: Tensor, num_experts: int, block_m: int, chunk: int = 32) -> Alignment:
    """Counting sort in plain torch, O(N * (chunk + E / chunk)) work, no sort and no host sync.

    Each chunk of `chunk` pairs ranks its pairs among equal experts with a [chunk, chunk]
    comparison and histograms them; an exclusive scan of the histograms over chunks gives each
    chunk's base within every expert's segment.
    """
    flat = ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = ids.device
    # One spare chunk: n_chunks >= 2 always, so compiled graphs never specialise on a single chunk.
    n_chunks = n // chunk + 2
    # Padding pairs go to a spare expert E, which lands past every real segment and is dropped.
    padded_ids = torch.cat([flat, flat.new_full((n_chunks * chunk - n,), num_experts)]).view(n_chunks, chunk)
    same = padded_ids.unsqueeze(2) == padded_ids.unsqueeze(1)
    earlier = torch.ones(chunk, chunk, device=dev, dtype=torch.bool).tril(-1)
    rank = (same & earlier).sum(-1)
    hist = torch.zeros(n_chunks, num_experts + 1, device=dev, dtype=torch.int64)
    hist = hist.scatter_add(1, padded_ids, torch.ones_like(padded_ids))
    base = hist.cumsum(0) - hist
    counts = hist[:, :num_experts].sum(0)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.cat([counts.new_zeros(1), padded.cumsum(0)])
    capacity = align_capacity(n, num_experts, block_m)
    # Spare-expert pairs write to a dump row at index `capacity`, cut off below.
    seg = torch.cat([offsets[:num_experts], offsets.new_full((1,), capacity)])
    pos = seg[padded_ids] + base.gather(1, padded_ids) + rank
    pos = torch.where(padded_ids == num_experts, capacity, pos).reshape(-1)
    src = torch.arange(n_chunks * chunk, device=dev, dtype=torch.int32)
    sorted_ids = torch.full((capacity + 1,), n, device=dev, dtype=torch.int32).scatter(0, pos, src)[:capacity]
    offsets32 = offsets.to(torch.int32)
    return Alignment(
        sorted_ids, _block_expert(offsets32, capacity, block_m), offsets32, counts.to(torch.int32)
    )


@torch.library.custom_op("glmc::moe_align", mutates_args=())
def moe_align_fused(ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .moe_align_triton import launch_moe_align

    return launch_moe_align(ids, num_experts, block_m)


@moe_align_fused.register_fake
def _(ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    capacity = align_capacity(ids.numel(), num_experts, block_m)
    i32 = torch.int32
    return (
        ids.new_empty(capacity, dtype=i32),
        ids.new_empty(capacity // block_m, dtype=i32),
        ids.new_empty(num_experts + 1, dtype=i32),
        ids.new_empty(num_experts, dtype=i32),
    )


def moe_align_triton(ids: Tensor, num_experts: int, block_m: int) -> Alignment:
    return Alignment(*moe_align_fused(ids, num_experts, block_m))
