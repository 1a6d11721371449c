"""Pipeline-parallel training on `torch.distributed.pipelining` (1F1B schedule).

The stages are the shard pass's (`pp_stages`, every node's `stage`): they are read from the
passed graph, never recomputed. Stage 0 holds the embedding and its trunk layers; the last stage
its trunk layers, the final norm, the LM head and the MTP layers. Every rank builds the whole
emitted model from the same seed and keeps its stage (`split_stages`); trunk layers keep their
one-process indices (`StageLayers`), so parameter names, checkpoints and the Hugging Face export
are those of one process. The stage is then parallelized like a whole model (FSDP2 over the
stage's data-parallel ranks, expert parallel over its ep ranks) with `StageModule` as the root.

What crosses a stage boundary, per micro-batch: the residual stream [mb, S, H] (fp32, the
parameters' dtype) and, when the balance loss is on, the running sum [1] of the sequence balance
loss over the MoE layers so far. Carrying the sum forward (rather than each stage adding a loss
of its own) makes the last stage's loss the one-process loss, and its gradient (balance_loss)
flows back through the boundary to every stage's routers. The last stage also reads the
micro-batch's token ids (a keyword input of the schedule) for the MTP layers and the labels
(the schedule's target) for the losses.

The MTP layer embeds the next tokens with the trunk's embedding table, which lives on stage 0.
The last stage keeps its own copy (as Megatron does for a tied output layer, and as
`glmc.ir.memory` counts it: a checkpoint-only copy whose owner sits on another stage is a real
copy) and the two never drift: after the backward the copy's gradient and the original's are
summed over the pair of ranks holding them (one all-reduce per step), so both hold the full
gradient and take the same optimizer step from the same state. Sending the embedded tokens
from stage 0 instead would save the copy but adds a [mb, S, H] activation send per micro-batch
and per MTP depth and a gradient send back; the copy costs one all-reduce of the table per step
and keeps each stage's inputs to what the schedule already moves. The copy is written to
checkpoints once, by its owner (stage 0).

Micro-batches: `--grad-accum N` is the number of pipeline micro-batches (1F1B needs N >= pp).
Each loss is a micro-batch mean; the schedule divides the accumulated gradients by N, so the
gradient is the full-batch one, as with gradient accumulation. Loss-free balancing: each
stage's routers count their own tokens over all micro-batches; the counts are all-reduced over
the stage's data-parallel ranks only (its own routers), and the per-layer loads are gathered
over the pipeline for the log.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from glmc.errors import GlmcError
from glmc.export.torch.model import GLMForCausalLM
from glmc.ir import Graph, stage_of
from glmc.train.balance import imbalance, routers
from glmc.train.config import TrainConfig
from glmc.train.losses import sequence_balance_loss, training_loss
from glmc.train.plan import Dist

EMBEDDING = "model.embed_tokens.weight"


def check_microbatches(grad_accum: int, pp: int) -> None:
    """1F1B keeps every stage busy only with at least one micro-batch per stage."""
    if pp > 1 and grad_accum < pp:
        raise GlmcError(
            f"--grad-accum {grad_accum} is the number of pipeline micro-batches and must be at least "
            f"pp={pp} (the 1F1B schedule needs one micro-batch per stage)"
        )


# --- stages from the passed graph --------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as the shard pass placed it."""

    index: int
    count: int
    first_layer: int
    last_layer: int
    copies: frozenset[str]  # parameters this stage holds as a copy of another stage's (EMBEDDING)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


def stage_plan(graph: Graph, index: int) -> Stage:
    """Stage `index` of the graph's `pp_stages`, checked against the nodes' own `stage`: the
    embedding on stage 0, trunk layers where `pp_stages` puts them, norm, head and MTP layers on
    the last stage. Copies: a tied parameter whose owner sits on another stage (the MTP layer's
    embedding, a tied LM head)."""
    stages = list(graph.attrs.pp_stages)
    if not stages:
        raise GlmcError("pipeline parallel training needs a graph the shard pass planned stages on")
    n_layers, last = graph.attrs.num_layers, len(stages) - 1
    first_layer, last_layer = stages[index]
    where = {i: s for s, (a, b) in enumerate(stages) for i in range(a, b + 1)}
    owner = {f"{n.name}.{p.name}": stage_of(n) for n in graph.nodes for p in n.params}
    copies: set[str] = set()
    for n in graph.nodes:
        layer = n.attrs.layer
        if n.name == "model.embed_tokens":
            want = 0
        elif layer is not None and int(layer) < n_layers:
            want = where[int(layer)]
        elif n.params or n.name.startswith("model.mtp."):
            want = last  # final norm, head, MTP layers
        else:
            continue
        if stage_of(n) != want:
            raise GlmcError(
                f"{n.name}: the shard pass put it on stage {stage_of(n)}, pipeline training expects "
                f"stage {want} (pp_stages {stages})"
            )
        for p in n.params:
            if p.tied_to is not None and stage_of(n) == index and owner.get(p.tied_to) != index:
                if p.tied_to != EMBEDDING:
                    raise GlmcError(
                        f"{n.name}.{p.name}: a copy of {p.tied_to} across stages is not supported"
                    )
                copies.add(p.tied_to)
    return Stage(index, len(stages), first_layer, last_layer, frozenset(copies))


class StageLayers(nn.Module):
    """A stage's trunk layers under their one-process indices (`model.layers.7.…` stays that
    name), iterated in order like the ModuleList it replaces."""

    def __init__(self, layers: dict[int, nn.Module]) -> None:
        super().__init__()
        for i, layer in sorted(layers.items()):
            self.add_module(str(i), layer)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._modules)


def split_stages(lm: GLMForCausalLM, stage: Stage) -> GLMForCausalLM:
    """Keep only `stage`'s part of `lm` (in place): its trunk layers, the embedding on stage 0
    (and where it is a copy), norm, head and MTP layers on the last stage."""
    model = lm.model
    keep = range(stage.first_layer, stage.last_layer + 1)
    model.layers = StageLayers({i: model.layers[i] for i in keep})  # type: ignore[assignment]
    if not (stage.is_first or EMBEDDING in stage.copies):
        delattr(model, "embed_tokens")
    if not stage.is_last:
        delattr(model, "norm")
        model.mtp = nn.ModuleList()
        lm.lm_head = None
    return lm


# --- the stage's module ------------------------------------------------------------------------


class StageModule(nn.Module):
    """The root module of one stage (FSDP2's root; what the schedule calls per micro-batch).

    forward: stage 0 takes token ids [mb, S]; later stages the residual stream [mb, S, H] (and
    the balance sum [1]). A middle stage returns (hidden[, balance]); the last stage returns
    (logits, MTP logits per depth..., [balance]) and needs `tokens` (the micro-batch's ids)."""

    def __init__(self, lm: GLMForCausalLM, sink: Any, *, stage: Stage, balance: bool, top_k: int) -> None:
        super().__init__()
        self.lm = lm
        self.sink = sink
        self.stage = stage
        self.balance = balance
        self.top_k = top_k
        self.copy_names = frozenset(f"lm.{n}" for n in stage.copies)  # read by checkpoint.save
        self.act_dtype = next(lm.parameters()).dtype

    def forward(self, *inputs: Tensor, tokens: Tensor | None = None) -> tuple[Tensor, ...]:
        model = self.lm.model
        stats: list[tuple[Tensor, Tensor]] | None = [] if self.balance else None
        self.sink.current = stats
        try:
            if self.stage.is_first:
                x = model.embed_tokens(inputs[0])
                carried = None
            else:
                x = inputs[0]
                carried = inputs[1] if self.balance else None
            B, S = x.shape[0], x.shape[1]
            rope = model.rope(torch.arange(S, device=x.device).expand(B, S))
            for layer in model.layers:
                x = layer(x, rope, stats)
            out: tuple[Tensor, ...]
            if self.stage.is_last:
                if tokens is None:
                    raise GlmcError("the last pipeline stage needs the micro-batch's token ids")
                h = model.norm(x)
                out = (self.lm.head(h), *self.lm.mtp_logits(tokens, h, rope, stats))
            else:
                # The boundary buffers are the parameters' dtype (the residual stream's under autocast).
                out = (x.to(self.act_dtype),)
        finally:
            self.sink.current = None
        if self.balance:
            out = (*out, self._balance(carried, stats or [], x))
        return out

    def _balance(self, carried: Tensor | None, stats: list[tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
        """The running sum of the per-layer sequence balance losses, in layer order (one layer at
        a time: the additions are those of one process)."""
        total = carried if carried is not None else torch.zeros(1, dtype=torch.float32, device=x.device)
        for s in stats:
            total = total + sequence_balance_loss([s], self.top_k)
        return total


# --- groups ------------------------------------------------------------------------------------


def embedding_group(d: Dist, needed: bool) -> dist.ProcessGroup | None:
    """The pair (first stage, last stage) of ranks at the same (dp, ep, tp) coordinate: they hold
    the embedding and its copy. Every rank takes part in creating every pair."""
    pp = d.plan.pp
    if not needed or pp == 1:
        return None
    stage_world = d.world // pp
    mine = None
    for c in range(stage_world):
        pair = [c, (pp - 1) * stage_world + c]
        g = dist.new_group(pair)
        if d.rank in pair:
            mine = g
    return mine


# --- the runner --------------------------------------------------------------------------------


class PipelineRunner:
    """One optimizer step's forward/backward over the pipeline: `step(ids, labels)` returns the
    sums over the micro-batches of (total, CE, MTP, balance) on the last stage's ranks (zeros
    elsewhere); `sync_grads()` sums the embedding copy's gradient with the original's;
    `replicas()` and `imbalance()` give the global gradient norm and expert loads their
    pipeline-wide meaning."""

    def __init__(
        self,
        module: nn.Module,
        d: Dist,
        *,
        microbatches: int,
        micro_size: int,
        seq_len: int,
        hidden: int,
        vocab: int,
        num_mtp: int,
        mtp_weight: float,
        balance_weight: float,
    ) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        root = cast(StageModule, module)
        self.module, self.d, self.stage = module, d, root.stage
        self.balance, self.num_mtp = root.balance, num_mtp
        self.mtp_weight, self.balance_weight, self.top_k = mtp_weight, balance_weight, root.top_k
        self.microbatches = microbatches
        self._parts: list[Tensor] = []
        dtype = root.act_dtype
        # Static shapes: the schedule then runs no extra forward to infer them (such a forward
        # would count tokens in the routers and move no gradient).
        meta = functools.partial(torch.empty, device="meta", requires_grad=True)
        boundary = (meta(micro_size, seq_len, hidden, dtype=dtype),) + (
            (meta(1, dtype=torch.float32),) if self.balance else ()
        )
        inputs = (
            (torch.empty(micro_size, seq_len, dtype=torch.long, device="meta"),)
            if self.stage.is_first
            else boundary
        )
        if self.stage.is_last:
            outputs = (
                meta(micro_size, seq_len, vocab, dtype=dtype),
                *(meta(micro_size, seq_len - k - 1, vocab, dtype=dtype) for k in range(num_mtp)),
                *((meta(1, dtype=torch.float32),) if self.balance else ()),
            )
        else:
            outputs = boundary
        pstage = PipelineStage(
            module, self.stage.index, self.stage.count, d.device,
            input_args=inputs, output_args=outputs, group=d.pp_group,
        )  # fmt: skip
        self.schedule = Schedule1F1B(pstage, microbatches, loss_fn=self._loss, scale_grads=True)
        # The embedding on stage 0 and its copy on the last stage (both summed in sync_grads).
        self.copies = [p for n, p in module.named_parameters() if _is_embedding(n)]
        self.embed_group = embedding_group(d, needed=_needs_copy(d, module))

    def _loss(self, output: tuple[Tensor, ...], labels: Tensor) -> Tensor:
        """The one-process loss of a micro-batch from the last stage's outputs; records its parts."""
        logits, mtp = output[0], list(output[1 : 1 + self.num_mtp])
        parts = training_loss(
            logits, mtp, [], labels, mtp_weight=self.mtp_weight, balance_weight=0.0, top_k=self.top_k
        )
        total, bal = parts.total, None
        if self.balance:
            bal = output[-1].reshape(())
            total = total + self.balance_weight * bal
        zero = torch.zeros((), device=total.device)
        values = [
            total,
            parts.lm,
            parts.mtp if parts.mtp is not None else zero,
            bal if bal is not None else zero,
        ]
        self._parts.append(torch.stack([v.detach().float() for v in values]))
        return total

    def step(self, ids: Tensor, labels: Tensor, autocast: contextlib.AbstractContextManager[Any]) -> Tensor:
        """Forward and backward of every micro-batch of (ids, labels) [batch, S] (this data-parallel
        rank's share of the step). Gradients are left accumulated, divided by the number of
        micro-batches and (FSDP2) reduce-scattered."""
        self._parts.clear()
        with autocast:
            if self.stage.is_first:
                self.schedule.step(ids, return_outputs=False)
            elif self.stage.is_last:
                self.schedule.step(target=labels, tokens=ids, return_outputs=False)
            else:
                self.schedule.step(return_outputs=False)
        sums = torch.zeros(4, device=self.d.device)
        for p in self._parts:  # in micro-batch order, as the accumulation loop adds them
            sums += p.to(self.d.device)
        return sums

    @property
    def has_mtp(self) -> bool:
        return self.num_mtp > 0

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Sum the embedding's gradient with its copy's (first and last stage)."""
        if self.embed_group is None:
            return
        for p in self.copies:
            if p.grad is not None:
                dist.all_reduce(_local(p.grad), group=self.embed_group)

    def replicas(self, base: dict[int, int | Tensor]) -> dict[int, int | Tensor]:
        """`base`: on how many ranks of this stage each parameter's piece lives (the one-stage
        count); the norm all-reduce runs over the whole world, and the embedding's piece also
        lives on the other end of the pipeline."""
        out = dict(base)
        if self.embed_group is not None:
            for p in self.copies:
                out[id(p)] = out.get(id(p), 1) * 2
        return out

    def imbalance(self, counts: Tensor | None) -> list[float]:
        """Per-MoE-layer max/mean loads of the whole model (stage order = layer order, MTP last)."""
        mine = imbalance(counts) if counts is not None else []
        parts: list[list[float]] = [[] for _ in range(self.stage.count)]
        dist.all_gather_object(parts, mine, group=self.d.pp_group)
        return [x for part in parts for x in part]


def pipeline_module(
    lm: GLMForCausalLM, graph: Graph, d: Dist, cfg: TrainConfig, micro_size: int
) -> tuple[nn.Module, PipelineRunner]:
    """This rank's stage of `lm`, placed and wrapped like a whole model (`parallelize` with
    `StageModule` as the root), and the runner of its schedule."""
    from glmc.train.parallel import parallelize

    rs = routers(lm)  # of the whole model: the balance loss runs where one process has one
    balance, top_k = cfg.balance_loss > 0 and bool(rs), rs[0].top_k if rs else 1
    stage = stage_plan(graph, d.pp_rank)
    split_stages(lm, stage)
    module = parallelize(
        lm, graph, d,
        compile=cfg.compile, activation_checkpoint=cfg.activation_checkpoint, fsdp=cfg.fsdp,
        root=functools.partial(StageModule, stage=stage, balance=balance, top_k=top_k),
    )  # fmt: skip
    runner = PipelineRunner(
        module, d,
        microbatches=cfg.grad_accum, micro_size=micro_size, seq_len=cfg.seq_len,
        hidden=graph.attrs.hidden_size, vocab=graph.attrs.vocab_size,
        num_mtp=graph.attrs.num_mtp_layers, mtp_weight=cfg.mtp_weight, balance_weight=cfg.balance_loss,
    )  # fmt: skip
    return module, runner


def _is_embedding(name: str) -> bool:
    return name.removeprefix("lm.") == EMBEDDING


def _needs_copy(d: Dist, module: nn.Module) -> bool:
    """Whether the last stage holds an embedding copy: every rank must agree (the pair groups
    are created collectively), so the last stage's answer is shared over the pipeline."""
    root = cast(StageModule, module)
    flag = torch.tensor([int(bool(root.stage.copies))], device=d.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
