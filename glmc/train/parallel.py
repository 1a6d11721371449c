"""Apply the plan to the emitted model: expert parallel, activation checkpointing, per-block
`torch.compile(fullgraph=True)`, FSDP2 — in torchtitan's order (§2.4, §2.7).

The emitted model is wrapped in `TrainModule`, whose forward is the training forward
(`forward_with_mtp` with balance statistics); FSDP2's root hooks fire on module calls, so the
root must be a module whose `forward` is what the step runs. State-dict keys gain `lm.`.

Gradient semantics: every loss is a per-rank mean over equal token counts, so the global-batch
gradient is the mean of the ranks' gradients. FSDP2 averages the dense ones over dp. Expert
weights under EP are owned by one rank of each EP group and receive gradient from every rank's
tokens through the all-to-all, so they are divided by dp and summed over their replicas (edp).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from glmc.export.torch.ep import EPExperts, shard_experts
from glmc.export.torch.model import MLP, Attention, DecoderLayer, GLMForCausalLM, MTPLayer
from glmc.train.balance import no_token_counting, routers
from glmc.train.plan import Dist


class StatsSink:
    """The step's balance-statistics list. FSDP2's pre-forward hooks rebuild a module's
    arguments (tree map), so a list passed into an FSDP-wrapped layer would be a copy and
    its appends lost; wrapped layers append to this shared list instead."""

    current: list[tuple[Tensor, Tensor]] | None = None


class TrainModule(nn.Module):
    """input_ids [B, S] -> (logits, MTP logits per depth, per-MoE-layer (scores, ids))."""

    def __init__(self, lm: GLMForCausalLM, sink: StatsSink) -> None:
        super().__init__()
        self.lm = lm
        self.sink = sink

    def forward(self, input_ids: Tensor, with_stats: bool = False) -> tuple[Tensor, list[Tensor], list[Any]]:
        stats: list[tuple[Tensor, Tensor]] | None = [] if with_stats else None
        self.sink.current = stats
        try:
            logits, mtp = self.lm.forward_with_mtp(input_ids, stats)
        finally:
            self.sink.current = None
        return logits, mtp, stats or []


def _with_sink(fn: Callable[..., Tensor], sink: StatsSink) -> Callable[..., Tensor]:
    def run(x: Tensor, rope: Any, stats: Any = None) -> Tensor:
        return fn(x, rope, sink.current if stats is not None else None)

    return run


def _checkpointed(fn: Callable[..., Tensor], lm: nn.Module) -> Callable[..., Tensor]:
    rs = routers(lm)

    def contexts() -> tuple[Any, Any]:
        return nullcontext(), no_token_counting(rs)  # recompute must not count tokens again

    def run(*args: Any) -> Tensor:
        return cast(Tensor, checkpoint(fn, *args, use_reentrant=False, context_fn=contexts))

    return run


def tensor_parallel(lm: nn.Module, tp_mesh: Any) -> None:
    """Megatron-style TP with torch's engine.

    Attention: q/k/v column-parallel (weights and biases split by output rows, i.e. by head),
    o_proj row-parallel (its output all-reduced). Each rank then runs nh/tp query and nkv/tp KV
    heads on its own; q_norm/k_norm (per head, over head_dim) stay replicated and their
    gradients, partial per rank, are summed in `sync_grads`.

    Dense MLPs and shared experts: gate/up column-parallel, down row-parallel, so SwiGLU runs on
    each rank's intermediate columns and one all-reduce per MLP sums the down projection. The
    routed experts and the router stay replicated (every tp rank routes the same tokens)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    attn_plan = {
        "q_proj": ColwiseParallel(),
        "k_proj": ColwiseParallel(),
        "v_proj": ColwiseParallel(),
        "o_proj": RowwiseParallel(),
    }
    mlp_plan = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}
    for m in list(lm.modules()):
        if isinstance(m, Attention):
            parallelize_module(m, tp_mesh, attn_plan)
            m.nh //= tp
            m.nkv //= tp
        elif isinstance(m, MLP):
            parallelize_module(m, tp_mesh, mlp_plan)


def tp_partial_params(module: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters used inside the head-split region: each tp rank's gradient covers
    only its own heads."""
    out: list[nn.Parameter] = []
    for m in module.modules():
        if isinstance(m, Attention) and m.qk_norm:
            out += [*m.q_norm.parameters(), *m.k_norm.parameters()]
    return out


def parallelize(
    lm: GLMForCausalLM, d: Dist, *, compile: bool, activation_checkpoint: bool, fsdp: bool
) -> TrainModule:
    plan = d.plan
    if plan.tp > 1:
        tensor_parallel(lm, d.tp_mesh)
    if plan.ep > 1:
        assert d.ep_group is not None
        shard_experts(lm, d.ep_group)
    layers = cast("list[DecoderLayer]", list(lm.model.layers))
    sink = StatsSink()
    for layer in layers:
        fwd: Callable[..., Tensor] = layer.forward
        if compile:
            # Instance attribute, not Module.compile(): the state-dict names stay unchanged and
            # FSDP2's hooks run eagerly around the compiled block.
            fwd = torch.compile(fwd, fullgraph=True)
        if activation_checkpoint:
            fwd = _checkpointed(fwd, lm)
        layer.forward = _with_sink(fwd, sink)  # type: ignore[method-assign]
    if compile:
        for mtp in cast("list[MTPLayer]", list(lm.model.mtp)):
            mtp.forward_mtp = torch.compile(mtp.forward_mtp, fullgraph=True)  # type: ignore[method-assign]
    module = TrainModule(lm, sink)
    if plan.dp > 1 and fsdp:
        from torch.distributed.fsdp import fully_shard

        ignored = set(expert_params(module))  # owned per EP rank; synchronised by sync_grads
        for layer in layers:
            fully_shard(layer, mesh=d.dp_mesh, ignored_params=ignored or None)
        fully_shard(module, mesh=d.dp_mesh, ignored_params=ignored or None)
    return module


def expert_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, EPExperts) for p in m.parameters()]


def replicas(module: nn.Module, d: Dist) -> dict[int, int]:
    """On how many ranks each parameter's local piece lives (for the global gradient norm)."""
    from torch.distributed.tensor import DTensor

    out = {}
    experts = {id(p) for p in expert_params(module)}
    for p in module.parameters():
        if id(p) in experts:
            out[id(p)] = d.plan.edp
        elif isinstance(p, DTensor):
            # Distinct pieces: the product of the sharded mesh dims (FSDP over dp, TP over tp);
            # every other rank of the world holds a copy of one of them.
            pieces = 1
            for i, pl in enumerate(p.placements):
                if not (pl.is_replicate() or pl.is_partial()):  # Shard, or FSDP+TP's _StridedShard
                    pieces *= p.device_mesh.size(i)
            out[id(p)] = d.world // pieces
        else:
            out[id(p)] = d.world
    return out


@torch.no_grad()
def sync_grads(module: nn.Module, d: Dist, fsdp: bool) -> None:
    """The gradient reductions FSDP2 does not do: expert-parallel experts, dense weights when
    FSDP is off (plain data parallel, one flat all-reduce), and under tensor parallel the sum over
    the tp ranks of q_norm/k_norm gradients (each rank's covers only its heads)."""
    if d.world == 1:
        return
    if d.plan.tp > 1:
        partial = [_local(p.grad) for p in tp_partial_params(module) if p.grad is not None]
        _all_reduce_flat(partial, d.tp_group)
        if d.plan.dp > 1 and not fsdp:
            dense = [_local(p.grad) for p in module.parameters() if p.grad is not None]
            _all_reduce_flat(dense, d.dp_group)
            for g in dense:
                g.div_(d.plan.dp)
        return
    experts = expert_params(module)
    if experts:
        grads = [p.grad for p in experts if p.grad is not None]
        if d.edp_group is not None:
            _all_reduce_flat(grads, d.edp_group)
        for g in grads:
            g.div_(d.plan.dp)
    if not (fsdp and d.plan.dp > 1):
        ids = {id(p) for p in experts}
        dense = [p.grad for p in module.parameters() if id(p) not in ids and p.grad is not None]
        _all_reduce_flat(dense, None)
        for g in dense:
            g.div_(d.plan.dp)


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _all_reduce_flat(grads: list[Tensor], group: dist.ProcessGroup | None) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
