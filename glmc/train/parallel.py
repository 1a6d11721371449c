"""Place the emitted model as the shard pass's ShardSpecs say, then activation checkpointing,
per-block `torch.compile(fullgraph=True)` and FSDP2 — in torchtitan's order (§2.4, §2.7).

`parallelize(lm, graph, d, ...)` is the one entry point (the trainer and the dry run call it).
How each parameter's ShardSpecs (glmc.ir.placement) become torch placements on the
(pp, dp, ep, tp) DeviceMesh `d.mesh`:

- `tp`, one segment, dim 0 of a Linear's weight (q/k/v, dense and shared gate/up): a DTensor
  `Shard(0)` on the tp sub-mesh via `ColwiseParallel` (bias split alike); dim 1 (o_proj, down):
  `Shard(1)` via `RowwiseParallel`, whose output all-reduce is the pass's `all_reduce` after
  attention / MLP. The LM head (dim 0, vocabulary rows): `ColwiseParallel` with a replicated
  output, i.e. the pass's `all_gather` of the logits; the embedding (dim 0): `RowwiseParallel`,
  a vocabulary-parallel lookup whose partial rows are all-reduced (the pass's `all_reduce`).
  Each Attention then runs nh/tp query and nkv/tp KV heads (model code unchanged).
- routed experts (`ep` index over dim 0, `tp` segments over the intermediate dim): plain local
  tensors in `glmc.export.torch.ep.ShardedExperts`, sliced by the ShardSpecs themselves
  (`Piece.local`): contiguous, load-aware and redundant slot maps alike; dispatch/combine is the
  pass's `all_to_all` over the ep sub-mesh's group, and the expert-TP partials are all-reduced
  over tp. They are replicated over `dp` (ignored by FSDP2) and their gradients summed there.
- every other trainable weight (no ShardSpec on an axis but tp): FSDP2 `Shard(0)` over the
  data-parallel axes dp x ep, flattened (`d.data_mesh`); with tp it composes with the TP
  DTensor (2-D). Norms, router, MTP eh_proj are replicated over tp.
- `pp`: stages are the pass's `pp_stages` (`d.stage`); the pipeline schedule lives in
  `pipeline_parallel.py`.

A placement training cannot hold (KV heads replicated over tp, fused segments outside the
experts, FP8 weights, a tied head under tp) is refused before any weight is sliced, naming it.

The model is wrapped in `TrainModule`, whose forward is the training forward (`forward_with_mtp`
with balance statistics); FSDP2's root hooks fire on module calls, so the root must be a module
whose `forward` is what the step runs. State-dict keys gain `lm.`.

Gradient semantics: every loss is a per-rank mean over equal token counts, so the global-batch
gradient is the mean over the dp x ep data ranks. FSDP2 averages the dense ones. Expert slots
receive gradient from every ep rank's tokens through the all-to-all, so they are summed over
their replicas (redundant copies over ep, then edp = dp) and divided by dp x ep.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from glmc.errors import GlmcError
from glmc.export.torch.ep import Piece, ShardedExperts, shard_experts
from glmc.export.torch.model import Attention, DecoderLayer, Experts, GLMForCausalLM, MTPLayer
from glmc.ir import AttentionAttrs, Graph, Op, ParamRole, ShardSpec, shard_specs
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


def placements(lm: nn.Module, graph: Graph) -> dict[str, tuple[ShardSpec, ...]]:
    """Model parameter name -> the pass's ShardSpecs for it (module paths equal IR node names).
    Refuses, naming it, a parameter the graph does not have or a placement training cannot hold."""
    params = {f"{n.name}.{p.name}": (n, p) for n in graph.nodes for p in n.params}
    out: dict[str, tuple[ShardSpec, ...]] = {}
    for name, t in lm.named_parameters():
        if name not in params:
            raise GlmcError(
                f"train: parameter {name} has no counterpart in the passed graph (fuse-moe renames fused "
                f"weights); training places the unfused model, so drop fuse-moe from --pipeline"
            )
        node, p = params[name]
        if p.dtype.is_float8:
            raise GlmcError(
                f"train: {name} is {p.dtype} (quantize-fp8): training FP8 weights is not supported"
            )
        specs = shard_specs(p)
        for sp in specs:
            if sp.axis == "tp" and p.role is not ParamRole.EXPERT and (len(sp.segments) > 1 or sp.index):
                raise GlmcError(f"train: cannot hold {name} split over tp in segments {list(sp.segments)}")
            if sp.axis == "tp" and any(r > 1 for r in sp.replicas):
                raise GlmcError(
                    f"train: {name} replicates KV heads over tp (tp > attention.num_kv_heads); training "
                    f"gives each tp rank whole KV heads of its own: use tp <= {AttentionAttrs.of(node).num_kv_heads}"
                )
        if tuple(t.shape) != tuple(p.shape):
            raise GlmcError(f"train: {name} has shape {list(t.shape)}, the graph says {list(p.shape)}")
        out[name] = specs
    return out


def _tp_style(node_op: Op, module: nn.Module, dim: int) -> Any:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if isinstance(module, nn.Embedding):  # vocabulary-parallel lookup, partial rows all-reduced
        return RowwiseParallel(input_layouts=Replicate())  # every tp rank reads the same ids
    if node_op is Op.LM_HEAD:  # vocabulary-parallel logits, all-gathered
        return ColwiseParallel(output_layouts=Replicate())
    return ColwiseParallel() if dim == 0 else RowwiseParallel()


def tensor_parallel(
    lm: GLMForCausalLM, graph: Graph, specs: dict[str, tuple[ShardSpec, ...]], tp_mesh: Any
) -> None:
    """Megatron-style TP with torch's engine, module by module, where the pass split a weight over
    tp (see the module docstring). q_norm/k_norm (per head, over head_dim) stay replicated; their
    gradients, partial per rank, are summed in `sync_grads`."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    nodes = {n.name: n for n in graph.nodes}
    # The model's flag, not `lm_head is None`: a pipeline stage without the head has none either.
    if lm.tie_word_embeddings and any(sp.axis == "tp" for sp in specs.get("model.embed_tokens.weight", ())):
        raise GlmcError("train: a tied LM head (tie_word_embeddings) cannot be split over tp yet; use tp=1")
    for path, m in list(lm.named_modules()):
        w = getattr(m, "weight", None)
        if not isinstance(m, (nn.Linear, nn.Embedding)) or not isinstance(w, nn.Parameter):
            continue
        tps = [sp for sp in specs.get(f"{path}.weight", ()) if sp.axis == "tp"]
        if not tps:
            continue
        node = nodes[path.rsplit(".", 1)[0]] if path not in nodes else nodes[path]
        parallelize_module(m, tp_mesh, _tp_style(node.op, m, tps[0].dim))
    for m in lm.modules():
        if isinstance(m, Attention) and isinstance(getattr(m, "q_proj", None), nn.Module):
            from torch.distributed.tensor import DTensor

            if isinstance(m.q_proj.weight, DTensor):
                m.nh //= tp
                m.nkv //= tp


def tp_partial_params(module: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters used inside the head-split region: each tp rank's gradient covers
    only its own heads."""
    out: list[nn.Parameter] = []
    for m in module.modules():
        if isinstance(m, Attention) and m.qk_norm:
            out += [*m.q_norm.parameters(), *m.k_norm.parameters()]
    return out


def _expert_pieces(
    lm: nn.Module, specs: dict[str, tuple[ShardSpec, ...]], d: Dist
) -> dict[str, dict[str, Piece]]:
    sizes = {"pp": d.plan.pp, "dp": d.plan.dp, "ep": d.plan.ep, "tp": d.plan.tp}
    ranks = {a: d.coord(a) for a in sizes}
    groups = {"ep": d.ep_group, "tp": d.tp_group, "dp": d.edp_group, "pp": d.pp_group}
    out: dict[str, dict[str, Piece]] = {}
    for path, m in lm.named_modules():
        if isinstance(m, Experts):
            ps = {n: specs.get(f"{path}.{n}", ()) for n in ("gate_up_proj", "down_proj")}
            if any(ps.values()):
                out[path] = {n: Piece(sp, sizes, ranks, groups) for n, sp in ps.items()}
    return out


def parallelize(
    lm: GLMForCausalLM,
    graph: Graph,
    d: Dist,
    *,
    compile: bool,
    activation_checkpoint: bool,
    fsdp: bool,
    root: Callable[[GLMForCausalLM, StatsSink], nn.Module] = TrainModule,
) -> nn.Module:
    """The placed training module: `lm`'s parameters held as `graph`'s ShardSpecs say on `d`'s
    mesh (module docstring), blocks compiled / checkpointed, FSDP2 over the data-parallel axes."""
    specs = placements(lm, graph)
    plan = d.plan
    if plan.tp > 1:
        tensor_parallel(lm, graph, specs, d.tp_mesh)
    pieces = _expert_pieces(lm, specs, d)
    if pieces:
        shard_experts(lm, pieces, d.ep_group, d.tp_group)
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
    module = root(lm, sink)  # TrainModule, or a pipeline stage's module (pipeline_parallel.py)
    if plan.data_parallel > 1 and fsdp:
        from torch.distributed.fsdp import fully_shard

        ignored = set(expert_params(module))  # held per ep/tp rank whole; synchronised by sync_grads
        for layer in layers:
            fully_shard(layer, mesh=d.data_mesh, ignored_params=ignored or None)
        fully_shard(module, mesh=d.data_mesh, ignored_params=ignored or None)
    return module


def expert_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, ShardedExperts) for p in m.parameters()]


def expert_modules(module: nn.Module) -> list[ShardedExperts]:
    return [m for m in module.modules() if isinstance(m, ShardedExperts)]


@dataclass(frozen=True)
class ExpertView:
    """How checkpoints see one expert tensor (a parameter or its optimiser state). A contiguous
    ep split without tp is a DTensor [Replicate over dp, Shard(0) over ep] (each rank writes
    or reads its slice); any other layout (expert-TP columns, load-aware or redundant slots) is
    gathered to the whole tensor, written once by rank 0 and sliced back on load."""

    piece: Piece
    mesh: Any  # the (dp, ep) sub-mesh

    @property
    def sliced(self) -> bool:
        ep = [s for s in self.piece.specs if s.axis == "ep"]
        if self.piece.has("tp") or len(ep) != 1:
            return False
        n, size = sum(ep[0].segments), self.piece.sizes["ep"]
        return not ep[0].index or list(ep[0].index) == [
            tuple(range(r * n // size, (r + 1) * n // size)) for r in range(size)
        ]

    def present(self, t: Tensor) -> Tensor:
        """The checkpoint's tensor for local `t` (a collective when gathered: every rank calls it
        in the same order)."""
        if self.sliced:
            from torch.distributed.tensor import DTensor, Replicate, Shard

            return DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False)
        return self.piece.full(t)

    def local(self, t: Tensor) -> Tensor:
        """This rank's piece of a loaded checkpoint tensor made by `present`."""
        from torch.distributed.tensor import DTensor

        return t.to_local() if isinstance(t, DTensor) else self.piece.local(t)


def expert_views(module: nn.Module, d: Dist) -> dict[str, ExpertView]:
    """Parameter name (as `module.named_parameters` gives it) -> its checkpoint view."""
    ids = {id(p): p for m in expert_modules(module) for p in m.parameters()}
    mesh = d.mesh["dp", "ep"] if d.mesh is not None else None
    return {
        n: ExpertView(p.glmc_piece, mesh)  # type: ignore[attr-defined]
        for n, p in module.named_parameters()
        if id(p) in ids
    }


def replicas(module: nn.Module, d: Dist) -> dict[int, int | Tensor]:
    """On how many ranks each parameter's local piece lives (for the global gradient norm); for
    expert slots a tensor with one count per slot (a redundant expert lives on several)."""
    from torch.distributed.tensor import DTensor

    holders = d.world // d.plan.pp  # a stage's parameters live on its ranks only
    out: dict[int, int | Tensor] = {}
    for m in expert_modules(module):
        for p in m.parameters():
            out[id(p)] = m.slot_replicas(d.plan.edp)
    for p in module.parameters():
        if id(p) in out:
            continue
        if isinstance(p, DTensor):
            # Distinct pieces: the product of the sharded mesh dims (FSDP over dp x ep, TP over tp);
            # every other rank of the stage holds a copy of one of them.
            pieces = 1
            for i, pl in enumerate(p.placements):
                if not (pl.is_replicate() or pl.is_partial()):  # Shard, or FSDP+TP's _StridedShard
                    pieces *= p.device_mesh.size(i)
            out[id(p)] = holders // pieces
        else:
            out[id(p)] = holders
    return out


@torch.no_grad()
def sync_grads(module: nn.Module, d: Dist, fsdp: bool) -> None:
    """The gradient reductions FSDP2 does not do: expert slots (redundant copies over ep, then
    the dp replicas; divided by the dp x ep data ranks), dense weights when FSDP is off (one flat
    all-reduce over the data-parallel group), and under tensor parallel the sum over the tp ranks
    of q_norm/k_norm gradients (each rank's covers only its heads)."""
    if d.world == 1:
        return
    _settle_dtensor_grads(module)
    if d.plan.tp > 1:
        partial = [_local(p.grad) for p in tp_partial_params(module) if p.grad is not None]
        _all_reduce_flat(partial, d.tp_group)
    n_data = d.plan.data_parallel
    experts = expert_modules(module)
    for m in experts:
        m.sum_replica_grads()
    grads = [p.grad for m in experts for p in m.parameters() if p.grad is not None]
    if grads:
        if d.edp_group is not None:
            _all_reduce_flat(grads, d.edp_group)
        for g in grads:
            g.div_(n_data)
    if n_data > 1 and not fsdp:
        ids = {id(p) for m in experts for p in m.parameters()}
        dense = [_local(p.grad) for p in module.parameters() if id(p) not in ids and p.grad is not None]
        _all_reduce_flat(dense, d.dp_group)
        for g in dense:
            g.div_(n_data)


def _settle_dtensor_grads(module: nn.Module) -> None:
    """Give every DTensor gradient its parameter's placements. The vocabulary-parallel
    embedding's comes back from backward as a pending (Partial) sum; norms, clipping and
    optimisers read local pieces and must see the parameter's shards."""
    from torch.distributed.tensor import DTensor

    for p in module.parameters():
        g = p.grad
        if isinstance(p, DTensor) and isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


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
