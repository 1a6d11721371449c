"""Routed experts placed as the shard pass says: expert slots over `ep`, expert-TP over `tp`.

`ShardedExperts` is a drop-in for `Experts` (same call, same parameter names) holding only this
rank's piece of the stacked weights: the experts its ep rank's slots name (the pass's `ep`
ShardSpec index: contiguous, load-aware, or with redundant replicas of busy experts), and of
each of them this tp rank's intermediate columns (the pass's `tp` ShardSpec: gate and up rows
split as two segments, down columns). The slicing is the ShardSpecs' own (`Piece.local`), so a
plan the pass accepts is held exactly as it printed it; nothing here re-derives a split.

Dispatch and combine follow torchtitan's all-to-all algorithm (reference/training-stack.md §2.5):
each (token, expert) pair is mapped to a slot holding that expert (an expert with replicas sends
its pairs round-robin over them), sorted by slot, counts exchanged, rows sent with
`all_to_all_single` (uneven splits; its autograd runs the reverse exchange), the local slots run
with the grouped GEMM, and the rows come back. Under expert-TP each tp rank computes its columns'
partial output for the same rows; the partials are all-reduced over tp *before* the router
weights multiply them, so the router's gradient is whole on every tp rank (a reduction after the
weighted sum moves k times fewer bytes but leaves the router weight's gradient partial). The
input's gradient through the experts is partial per tp rank and is all-reduced in backward
(Megatron's f/g pair). Every step is a traceable functional collective, so a block holding it
compiles with `torch.compile(fullgraph=True)` (data-dependent splits become unbacked SymInts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

from glmc.ir import ShardSpec
from glmc.kernels.grouped_mm import grouped_mm

from .model import Experts


@dataclass(frozen=True)
class Piece:
    """Where a rank's local tensor sits in the full one: the pass's ShardSpecs (applied in
    order), and per mesh axis its size, this rank's index and the group along it."""

    specs: tuple[ShardSpec, ...]
    sizes: Mapping[str, int]
    ranks: Mapping[str, int]
    groups: Mapping[str, dist.ProcessGroup | None]

    def only(self, axis: str) -> Piece:
        return Piece(tuple(s for s in self.specs if s.axis == axis), self.sizes, self.ranks, self.groups)

    def has(self, axis: str) -> bool:
        return any(s.axis == axis for s in self.specs)

    def _index(self, s: ShardSpec, rank: int, device: torch.device) -> Tensor:
        ranges = s.absolute_ranges(self.sizes[s.axis], rank)
        return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])

    def local(self, full: Tensor) -> Tensor:
        """This rank's piece of `full` (a copy)."""
        t = full
        for s in self.specs:
            t = t.index_select(s.dim, self._index(s, self.ranks[s.axis], t.device))
        return t.contiguous()

    def full(self, local: Tensor) -> Tensor:
        """The whole tensor from every rank's piece (a collective over the spec axes' groups).
        Replicas of one expert hold equal values, so where several ranks cover a position any
        one of them may land there."""
        t = local.contiguous()
        for s in reversed(self.specs):
            size = self.sizes[s.axis]
            parts = [torch.empty_like(t) for _ in range(size)]
            group = self.groups.get(s.axis)
            if size > 1:
                dist.all_gather(parts, t, group=group)
            else:
                parts = [t]
            shape = list(t.shape)
            shape[s.dim] = sum(s.segments) if not s.index else 1 + max(i for r in s.index for i in r)
            out = t.new_zeros(shape)
            for r, part in enumerate(parts):
                out.index_copy_(s.dim, self._index(s, r, t.device), part)
            t = out
        return t


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (each rank's is partial)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return funcol.wait_tensor(funcol.all_reduce(g.contiguous(), "sum", ctx.group)), None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward (partial sums over the columns); identity backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return g, None


class ShardedExperts(nn.Module):
    """This rank's expert slots gate_up [S, 2I/tp, H], down [S, H, I/tp] (S = slots per ep rank)."""

    def __init__(
        self,
        full: Experts,
        pieces: Mapping[str, Piece],
        ep_group: dist.ProcessGroup | None,
        tp_group: dist.ProcessGroup | None,
    ) -> None:
        super().__init__()
        if full.recipe is not None:
            raise ValueError("FP8 experts cannot be trained")
        self.pieces = dict(pieces)  # parameter name -> Piece
        gu = pieces["gate_up_proj"]
        self.ep, self.tp = gu.sizes["ep"], gu.sizes["tp"]
        self.ep_rank = gu.ranks["ep"]
        self.ep_group, self.tp_group = ep_group, tp_group
        self.num_experts = full.gate_up_proj.shape[0]
        ep_spec = next((s for s in gu.specs if s.axis == "ep"), None)
        slots = ep_spec.index if ep_spec is not None and ep_spec.index else None
        if slots is None:  # no ep split: every expert, in order, on every rank
            slots = (tuple(range(self.num_experts)),) * self.ep
        self.slots = slots
        self.num_local = len(slots[self.ep_rank])
        # For each expert, the global slots (rank * S + j) that hold it, padded by repetition.
        holders: list[list[int]] = [[] for _ in range(self.num_experts)]
        for r, held in enumerate(slots):
            for j, e in enumerate(held):
                holders[e].append(r * self.num_local + j)
        width = max(len(h) for h in holders)
        table = [h + [h[0]] * (width - len(h)) for h in holders]
        self.copies: Tensor
        self.register_buffer("copies", torch.tensor([len(h) for h in holders]), persistent=False)
        self.slot_of: Tensor
        self.register_buffer("slot_of", torch.tensor(table, dtype=torch.int64), persistent=False)
        self.gate_up_proj = nn.Parameter(pieces["gate_up_proj"].local(full.gate_up_proj.detach()))
        self.down_proj = nn.Parameter(pieces["down_proj"].local(full.down_proj.detach()))
        # Optimisers that need whole matrices (Muon) and state readers find the layout here.
        for n in ("gate_up_proj", "down_proj"):
            getattr(self, n).glmc_piece = self.pieces[n]

    @property
    def held(self) -> tuple[int, ...]:
        """The expert id in each local slot."""
        return self.slots[self.ep_rank]

    def slot_replicas(self, edp: int) -> Tensor:
        """On how many ranks each local slot's piece lives: its expert's copies times edp."""
        return self.copies[list(self.held)].double().cpu() * edp

    def _experts(self, xs: Tensor, offs: Tensor) -> Tensor:
        gu = grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs)
        gate, up = gu.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs)

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """x [T, H], ids/weights [T, k] over all E experts -> [T, H], like `Experts`."""
        T, k = ids.shape
        if self.tp_group is not None:
            x = _CopyToGroup.apply(x, self.tp_group)
        flat = ids.reshape(-1)
        if self.slot_of.shape[1] > 1:  # replicas: pair i goes to copy i mod (copies of its expert)
            pick = torch.arange(flat.numel(), device=x.device) % self.copies[flat]
            slot = self.slot_of[flat, pick]
        else:
            slot = self.slot_of[flat, 0]
        order = torch.argsort(slot, stable=True)
        token = order // k
        S, ep = self.num_local, self.ep
        counts = torch.zeros(S * ep, dtype=torch.int64, device=x.device).scatter_add_(
            0, slot, torch.ones_like(slot)
        )
        if self.ep_group is None:
            rows = self._experts(x[token], counts.cumsum(0).to(torch.int32))
        else:
            rows = self._dispatch_and_run(x[token], counts)
        if self.tp_group is not None:
            rows = _ReduceFromGroup.apply(rows, self.tp_group)
        rows = rows * weights.reshape(-1)[order, None]
        out = torch.zeros(T, x.shape[1], dtype=rows.dtype, device=x.device).index_add(0, token, rows)
        return out.to(x.dtype)

    def _dispatch_and_run(self, sent: Tensor, counts: Tensor) -> Tensor:
        S, ep, group = self.num_local, self.ep, self.ep_group
        assert group is not None
        # recv_counts[r*S + j]: rows rank r sends to my local slot j.
        recv_counts = funcol.wait_tensor(funcol.all_to_all_single(counts, [S] * ep, [S] * ep, group))
        send_splits = counts.view(ep, S).sum(1).tolist()
        recv_matrix = recv_counts.view(ep, S)
        recv_splits = recv_matrix.sum(1).tolist()
        for s in send_splits + recv_splits:  # unbacked sizes under compile: tell the tracer
            torch._check(s >= 0)
        rows = sum(recv_splits)
        recv = funcol.wait_tensor(funcol.all_to_all_single_autograd(sent, recv_splits, send_splits, group))
        # Rank-major (r0:s0,s1..; r1:s0,s1..) -> slot-major (s0:r0,r1..; s1:..), stable.
        local_ids = torch.arange(S, device=sent.device).repeat(ep)
        row_slot = torch.repeat_interleave(local_ids, recv_matrix.reshape(-1), output_size=rows)
        perm = torch.argsort(row_slot, stable=True)
        ys = self._experts(recv[perm], recv_matrix.sum(0).cumsum(0).to(torch.int32))
        back = torch.empty_like(ys).index_copy(0, perm, ys)  # undo the slot-major re-sort
        return funcol.wait_tensor(funcol.all_to_all_single_autograd(back, send_splits, recv_splits, group))

    @torch.no_grad()
    def sum_replica_grads(self) -> None:
        """Experts with several copies (redundant experts): each copy's gradient covers the
        tokens it served; sum them over the ep group so every copy steps alike."""
        if self.ep_group is None or self.slot_of.shape[1] == 1:
            return
        shared = [e for e in range(self.num_experts) if int(self.copies[e]) > 1]
        row = {e: i for i, e in enumerate(shared)}
        for p in (self.gate_up_proj, self.down_proj):
            if p.grad is None:
                continue
            buf = p.grad.new_zeros((len(shared), *p.grad.shape[1:]))
            mine = [(j, row[e]) for j, e in enumerate(self.held) if e in row]
            for j, i in mine:
                buf[i] += p.grad[j]
            dist.all_reduce(buf, group=self.ep_group)
            for j, i in mine:
                p.grad[j].copy_(buf[i])


def shard_experts(
    model: nn.Module,
    pieces: Mapping[str, Mapping[str, Piece]],
    ep_group: dist.ProcessGroup | None,
    tp_group: dist.ProcessGroup | None,
) -> list[str]:
    """Swap every `Experts` at a path in `pieces` (module path -> parameter name -> Piece) for a
    `ShardedExperts`; returns the swapped paths. Weights must already be initialised (each rank
    keeps its piece)."""
    swapped = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, Experts) and path in pieces:
                setattr(mod, child_name, ShardedExperts(child, pieces[path], ep_group, tp_group))
                swapped.append(path)
    return swapped
