"""The training loop: `train(TrainConfig)` runs one process's share of a (possibly torchrun-
launched) run. Every input is checked — spec, plan vs world size, data, tokenizer vs vocab,
resume checkpoint — before the model is built, so bad input stops before any step runs.

One optimizer step: `grad_accum` times [forward (bf16 autocast on GPU, fp32 on CPU) -> CE + MTP +
balance loss, divided by grad_accum -> backward] -> gradient sync the plan needs beyond FSDP2 ->
global-norm clip -> loss-free bias update from the all-reduced token counts -> Muon/AdamW step ->
schedule step -> metrics.

Gradient accumulation: `batch_size` is the global batch of one optimizer step. The sampler hands
each data-parallel rank its part of it, which is cut into `grad_accum` equal micro-batches, so the
step sees exactly the sequences it sees with grad_accum = 1. Every loss is a mean over equal token
(or sequence) counts per micro-batch, so the sum of the micro-batch losses / grad_accum is the
full-batch loss and the accumulated gradient the full-batch gradient. FSDP2 reduce-scatters only
after the last micro-batch's backward; routers keep counting over all micro-batches and the bias
updates once per step, so every micro-batch routes with the same bias.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch.distributed as dist

from glmc.api import build_torch, compile_graph, resolve_spec
from glmc.errors import GlmcError
from glmc.ir import flops_per_token, shard_specs
from glmc.passes.shard import check_launch
from glmc.resources import check_training
from glmc.train import balance, checkpoint, run_folder
from glmc.train.config import TrainConfig
from glmc.train.data import PackedData, check_vocab, list_files, load_tokens, make_tokenizer
from glmc.train.losses import training_loss
from glmc.train.optim import build_optimizers, build_schedulers, clip_grad_norm
from glmc.train.parallel import parallelize, replicas, sync_grads
from glmc.train.pipeline_parallel import PipelineRunner, check_microbatches, pipeline_module
from glmc.train.plan import Dist, ParallelPlan, plan_pipeline, setup, teardown, world_from_env
from glmc.train.telemetry import Telemetry, default_peak_tflops


@dataclass
class TrainResult:
    run_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)  # this run's steps
    checkpoint: Path | None = None
    hf_dir: Path | None = None


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    from glmc.runtime.cpu import fast_bf16  # auto: bf16 autocast (fp32 master weights) where fast

    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and fast_bf16(device)[0])
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: TrainConfig) -> TrainResult:
    spec = resolve_spec(cfg.spec)
    _, world, _ = world_from_env()
    # --dp/--ep/--tp/--pp are shorthands for a shard pass: one plan, read from the passed graph.
    pipeline = plan_pipeline(cfg.pipeline, dp=cfg.dp, ep=cfg.ep, tp=cfg.tp, pp=cfg.pp, world=world)
    graph = compile_graph(spec, pipeline)
    check_trainable(graph)
    check_compilable(cfg, graph)
    check_launch(graph, world)  # the pass's rule: its mesh against the launch, naming the degrees
    check_microbatches(cfg.grad_accum, ParallelPlan.from_graph(graph).pp)
    check_training(spec, world)  # refuse a model that cannot fit, before allocating
    d = setup(ParallelPlan.from_graph(graph))
    try:
        return _train(cfg, spec, graph, d)
    finally:
        teardown(d)


def check_trainable(graph: Any) -> None:
    """What the passed graph asks for that training cannot do, refused before any model exists."""
    if graph.attrs.quantization is not None:  # ran, even where it kept every weight (too small)
        raise GlmcError(
            f"train: the pipeline ran quantize-fp8 (recipe {graph.attrs.quantization}); training FP8 "
            f"weights is not supported: drop quantize-fp8 from --pipeline"
        )
    for n in graph.nodes:
        for p in n.params:
            if p.dtype.is_float8:
                raise GlmcError(
                    f"train: the pipeline ran quantize-fp8 ({n.name}.{p.name} is {p.dtype}); training FP8 "
                    f"weights is not supported: drop quantize-fp8 from --pipeline"
                )
            for sp in shard_specs(p):
                if sp.axis == "tp" and any(r > 1 for r in sp.replicas):
                    raise GlmcError(
                        f"train: the shard pass replicates KV heads over tp ({n.name}.{p.name}: tp > "
                        f"num_kv_heads); training gives each tp rank whole KV heads of its own: use a smaller tp"
                    )


def check_compilable(cfg: TrainConfig, graph: Any) -> None:
    """Compiled blocks under tensor parallel fail in the first backward since the pass's split
    of the vocabulary and the routed experts over tp reached training: torch 2.13's DTensor
    redistribution receives a plain-tensor gradient from the compiled block ('Tensor' object
    has no attribute '_local_tensor'). Refused by name before any model exists, not crashed."""
    tp = ParallelPlan.from_graph(graph).tp
    if cfg.compile and tp > 1:
        raise GlmcError(
            f"train: --compile with tensor parallel (tp={tp}) is not supported yet (the compiled blocks' "
            "backward breaks DTensor's redistribution); pass --no-compile"
        )


def micro_batch_size(cfg: TrainConfig, dp: int) -> int:
    """Sequences per micro-batch on one data-parallel rank: batch_size / (dp · grad_accum)."""
    if cfg.batch_size % (dp * cfg.grad_accum):
        raise GlmcError(
            f"--batch-size {cfg.batch_size} must be a multiple of the data-parallel degree {dp} "
            f"times --grad-accum {cfg.grad_accum} (= {dp * cfg.grad_accum}): each rank's share of the "
            f"global batch is cut into grad_accum equal micro-batches"
        )
    return cfg.batch_size // (dp * cfg.grad_accum)


def _gradient_sync(module: torch.nn.Module, on: bool) -> None:
    """FSDP2: reduce-scatter gradients in this backward (on) or keep accumulating them unsharded
    (off); applies to every FSDP2 module under the root. A no-op without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(on)


def micro_batch_backward(
    module: torch.nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    top_k: int,
    m: int,
    autocast: contextlib.AbstractContextManager[Any],
) -> Any:
    """Micro-batch `m` of `cfg.grad_accum`: forward under `autocast`, CE + MTP + balance loss,
    backward of loss / grad_accum (FSDP2 reduce-scatters in the last one's backward only).
    Returns the losses (their graph freed by the backward). The trainer and the dry run
    (dryrun.py) both step through this."""
    accum = cfg.grad_accum
    if accum > 1:
        _gradient_sync(module, m == accum - 1)
    with autocast:
        logits, mtp_logits, stats = module(ids, with_stats=cfg.balance_loss > 0)
    losses = training_loss(
        logits, mtp_logits, stats, labels,
        mtp_weight=cfg.mtp_weight, balance_weight=cfg.balance_loss, top_k=top_k,
    )  # fmt: skip
    # Equal-sized micro-batches of per-token / per-sequence means: /accum makes the
    # accumulated gradient the full-batch one (exact for accum = 1).
    (losses.total / accum).backward()
    return losses


def _prepare_data(cfg: TrainConfig, vocab_size: int, d: Dist) -> tuple[PackedData, dict[str, Any]]:
    tok = make_tokenizer(cfg.tokenizer)
    check_vocab(tok, vocab_size)
    micro_batch_size(cfg, d.plan.data_parallel)
    # The run folder is never training data, even when it lies inside a --data folder.
    files = list_files(cfg.data, cfg.include, cfg.exclude, skip=(cfg.run_dir,))
    tokens = load_tokens(files, tok, cfg.max_bytes)
    data = PackedData.pack(tokens, cfg.seq_len, cfg.seed)
    data.check(cfg.batch_size)
    info = {
        "tokenizer": tok.name,
        "tokenizer_vocab": tok.vocab_size,
        "files": len(files),
        "tokens": int(tokens.numel()),
        "seq_len": cfg.seq_len,
        "num_sequences": data.num_sequences,
        # What a resumed run must read again: the whole token stream, not just its size.
        "sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
    }
    return data, info


def _train(cfg: TrainConfig, spec: Any, graph: Any, d: Dist) -> TrainResult:
    data, data_info = _prepare_data(cfg, spec.vocab_size, d)
    spec_json = spec.model_dump(mode="json")
    begin = run_folder.plan_start(cfg)
    resume = begin.resume
    ck = checkpoint.open_checkpoint(resume) if resume is not None else None
    if ck is not None:
        checkpoint.check_same_run(ck, cfg.to_dict(), spec_json, data_info)
        if ck.state.step >= cfg.steps:
            raise GlmcError(
                f"{resume}: already at step {ck.state.step}; --steps {cfg.steps} leaves nothing to run"
            )
    d.barrier()  # every rank has looked at the run folder before rank 0 changes it
    if begin.clear and d.is_main:
        run_folder.clear(cfg.run_dir)

    torch.manual_seed(cfg.seed)
    lm = build_torch(spec, dtype=torch.float32, seed=cfg.seed).to(d.device)
    lm.train()
    rs = balance.routers(lm)
    if cfg.init_router_bias is not None:
        with torch.no_grad():
            for r in rs:
                if r.e_score_correction_bias is not None:
                    r.e_score_correction_bias.copy_(torch.tensor(cfg.init_router_bias))
    if cfg.compile:
        torch._dynamo.config.capture_scalar_outputs = True  # EP split sizes come from .tolist()
    pipe: PipelineRunner | None = None
    if d.plan.pp > 1:  # this rank's stage under a 1F1B schedule (pipeline_parallel.py)
        module, pipe = pipeline_module(lm, graph, d, cfg, micro_batch_size(cfg, d.plan.data_parallel))  # type: ignore[arg-type]
        rs = balance.routers(module)  # the stage's own routers: their counts stay in the stage
    else:
        module = parallelize(
            lm,  # type: ignore[arg-type]
            graph,
            d,
            compile=cfg.compile,
            activation_checkpoint=cfg.activation_checkpoint,
            fsdp=cfg.fsdp,
        )
    opts = build_optimizers(module, cfg)
    scheds = build_schedulers(opts, cfg)
    params = list(module.parameters())
    reps = replicas(module, d)
    if pipe is not None:
        reps = pipe.replicas(reps)
    start = 0
    if ck is not None:
        checkpoint.load(ck, module, opts, d)
        checkpoint.restore_schedulers(ck, scheds)
        start = ck.state.step

    peak, peak_note = (
        (cfg.peak_tflops, f"{cfg.peak_tflops} TFLOP/s (given)")
        if cfg.peak_tflops
        else default_peak_tflops(d.device)
    )
    train_flops = flops_per_token(graph, cfg.seq_len)["training"]
    accum = cfg.grad_accum
    micro = micro_batch_size(cfg, d.plan.data_parallel)
    tele = Telemetry(cfg.run_dir, d.is_main, cfg.progress, cfg.steps, start, cfg.log_every)
    tele.say(
        f"[bold]glmc train[/] {spec.name}: {data_info['tokens']:,} tokens from {data_info['files']} files "
        f"({data_info['num_sequences']:,} sequences of {cfg.seq_len}); plan {d.plan.describe()}; "
        f"global batch {cfg.batch_size}"
        + (f" ({cfg.grad_accum} micro-batches of {micro} per rank)" if cfg.grad_accum > 1 else "")
        + f"; {cfg.optimizer}; compile={cfg.compile}; device {d.device}; "
        f"MFU peak: {peak_note}" + (f"; resuming at step {start} from {resume}" if start else "")
    )
    if begin.note:
        tele.say(begin.note)
    result = TrainResult(cfg.run_dir)
    top_k = spec.moe.top_k if spec.moe is not None else 1
    dp = d.plan.data_parallel  # ranks reading distinct data: dp x ep
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            ids, labels = data.batch(step, cfg.batch_size, d.dp_rank, dp)
            ids, labels = ids.to(d.device), labels.to(d.device)
            # Sums over the micro-batches of (total, CE, MTP, balance); the step's losses are their means.
            sums = torch.zeros(4, device=d.device)
            has_mtp = has_bal = False
            if pipe is not None:  # the schedule runs every micro-batch's forward and backward
                sums, has_mtp, has_bal = (
                    pipe.step(ids, labels, _autocast(cfg, d.device)),
                    pipe.has_mtp,
                    pipe.balance,
                )
            for m in range(accum if pipe is None else 0):
                part = slice(m * micro, (m + 1) * micro)
                losses = micro_batch_backward(
                    module, ids[part], labels[part], cfg, top_k, m, _autocast(cfg, d.device)
                )
                has_mtp, has_bal = losses.mtp is not None, losses.balance is not None
                sums += torch.stack([
                    losses.total.detach().float(),
                    losses.lm.detach().float(),
                    (losses.mtp if losses.mtp is not None else torch.zeros(())).detach().float().to(d.device),
                    (losses.balance if losses.balance is not None else torch.zeros(())).detach().float().to(d.device),
                ])  # fmt: skip
                del losses
            sync_grads(module, d, cfg.fsdp)
            if pipe is not None:
                pipe.sync_grads()
            gnorm = clip_grad_norm(params, reps, cfg.grad_clip)
            # Summed over the data-parallel ranks (dp x ep) only: a data rank's tp ranks see the same tokens.
            counts = balance.global_counts(rs, d.dp_group, reduce=dp > 1) if rs else None
            if counts is not None:
                balance.update_bias(rs, counts, cfg.bias_update_rate)
            lr = scheds[0].get_last_lr()[0]
            for o in opts:
                o.step()
            for s in scheds:
                s.step()
            for o in opts:
                o.zero_grad(set_to_none=True)
            vals = sums / accum
            if d.world > 1:
                dist.all_reduce(vals)
                # Only the last pipeline stage holds losses (every rank when pp = 1), and a data
                # rank's losses appear on each of its tp ranks: the mean over one stage's ranks.
                vals /= d.world // d.plan.pp
            total, lm_loss, mtp_loss, bal_loss = vals.tolist()
            dt = time.perf_counter() - t0
            tok_s = cfg.batch_size * cfg.seq_len / dt  # the global batch: every micro-batch of every rank
            if pipe is not None:
                imb = pipe.imbalance(counts)  # every stage's layers, in layer order
            else:
                imb = balance.imbalance(counts) if counts is not None else []
            rec: dict[str, Any] = {
                "step": step + 1,
                "loss": total,
                "lm_loss": lm_loss,
                "mtp_loss": mtp_loss if has_mtp else None,
                "balance_loss": bal_loss if has_bal else None,
                "lr": lr,
                "grad_norm": gnorm,
                "tokens_per_s": tok_s,
                "mfu": tok_s * train_flops / (peak * 1e12 * d.world),
                "load_imbalance": imb,
                "load_imbalance_mean": sum(imb) / len(imb) if imb else None,
                "step_time_s": dt,
            }
            result.records.append(rec)
            tele.log(rec)
            done = step + 1
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                ts = checkpoint.TrainerState(
                    done, [s.state_dict() for s in scheds], cfg.to_dict(), data_info, spec_json
                )
                result.checkpoint = checkpoint.save(cfg.run_dir, module, opts, ts, d, cfg.keep_checkpoints)
        if cfg.export_hf:
            result.hf_dir = checkpoint.export_hf(module, spec, cfg.run_dir / "hf", d)
            if result.hf_dir is not None:
                tele.say(f"wrote the Hugging Face checkpoint {result.hf_dir}")
    finally:
        tele.close()
    return result
