"""Expert parallelism: the routed experts split across ranks, tokens moved with all-to-all.

`EPExperts` is a drop-in for `Experts` (same call, same parameter names) that holds only this
rank's slice of the stacked weights: experts [r*E/ep, (r+1)*E/ep) on EP rank r. The algorithm is
torchtitan's all-to-all dispatcher (reference/training-stack.md §2.5):

1. sort the local (token, slot) pairs by expert (stable, so token order survives within an expert);
2. exchange per-expert counts (one all-to-all of E integers) and turn them into split sizes;
   this is the one device->host sync per MoE layer that EP needs;
3. send the rows with `all_to_all_single` (uneven splits; its autograd runs the reverse exchange);
4. re-sort the received rows from rank-major to expert-major order, run the local experts with
   the grouped GEMM, undo the re-sort, send the rows back, weight them and sum per token.

Every step is a traceable functional collective, so a block holding it compiles with
`torch.compile(fullgraph=True)` (data-dependent splits become unbacked SymInts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

from glmc.kernels.grouped_mm import grouped_mm

from .model import Experts


class EPExperts(nn.Module):
    """Local experts gate_up [E/ep, 2I, H], down [E/ep, H, I] of an expert-parallel group."""

    def __init__(self, full: Experts, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = full.gate_up_proj.shape[0]
        if self.num_experts % self.ep:
            raise ValueError(f"{self.num_experts} experts do not split evenly over {self.ep} EP ranks")
        self.num_local = self.num_experts // self.ep
        lo = self.ep_rank * self.num_local
        sl = slice(lo, lo + self.num_local)
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[sl].clone())
        self.down_proj = nn.Parameter(full.down_proj.detach()[sl].clone())

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """x [T, H], ids/weights [T, k] over all E experts -> [T, H], like `Experts`."""
        T, k = ids.shape
        E, El, ep = self.num_experts, self.num_local, self.ep
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )
        # recv_counts[r*El + e]: rows rank r sends to my local expert e.
        recv_counts = funcol.all_to_all_single(counts, [El] * ep, [El] * ep, self.group)
        recv_counts = funcol.wait_tensor(recv_counts)
        send_splits = counts.view(ep, El).sum(1).tolist()
        recv_matrix = recv_counts.view(ep, El)
        recv_splits = recv_matrix.sum(1).tolist()
        for s in send_splits + recv_splits:  # unbacked sizes under compile: tell the tracer
            torch._check(s >= 0)
        rows = sum(recv_splits)
        recv = funcol.all_to_all_single_autograd(x[token], recv_splits, send_splits, self.group)
        recv = funcol.wait_tensor(recv)
        # Rank-major (r0:e0,e1..; r1:e0,e1..) -> expert-major (e0:r0,r1..; e1:..), stable.
        local_ids = torch.arange(El, device=x.device).repeat(ep)
        row_expert = torch.repeat_interleave(local_ids, recv_matrix.reshape(-1), output_size=rows)
        perm = torch.argsort(row_expert, stable=True)
        offs = recv_matrix.sum(0).cumsum(0).to(torch.int32)
        xs = recv[perm]
        gu = grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs)
        gate, up = gu.chunk(2, dim=-1)
        ys = grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs)
        back = torch.empty_like(ys).index_copy(0, perm, ys)  # undo the expert-major re-sort
        out_rows = funcol.all_to_all_single_autograd(back, send_splits, recv_splits, self.group)
        out_rows = funcol.wait_tensor(out_rows)
        out_rows = out_rows * weights.reshape(-1)[order, None]
        out = torch.zeros(T, x.shape[1], dtype=out_rows.dtype, device=x.device).index_add(0, token, out_rows)
        return out.to(x.dtype)


def shard_experts(model: nn.Module, group: dist.ProcessGroup) -> list[str]:
    """Swap every `Experts` in `model` for an `EPExperts` over `group`; returns the swapped
    module paths. Weights must already be initialised (each rank keeps its slice)."""
    swapped = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Experts):
                setattr(mod, child_name, EPExperts(child, group))
                swapped.append(f"{name}.{child_name}" if name else child_name)
    return swapped
