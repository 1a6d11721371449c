"""Train the emitted model on local text with GLM-4.5's recipe (Muon + AdamW, MTP loss,
loss-free balancing). One process, or many under torchrun:

    glmc train glm-small --data corpus/ --steps 300
    torchrun --nproc_per_node=4 $(which glmc) train glm-tiny --data corpus/ --pipeline 'shard{ep=2,tp=2}'
"""

from __future__ import annotations

import argparse
import math
import os

from glmc.commands._common import EXIT_OK, add_spec_argument

NAME = "train"
HELP = "Train a spec on local text files (torchrun for several processes)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from glmc.train.config import TrainConfig

    d = TrainConfig()
    add_spec_argument(p)
    p.add_argument("--data", action="append", required=True, help="text file or folder (repeatable)")
    p.add_argument("-o", "--out", default=d.out, help=f"run folder (default {d.out})")
    p.add_argument("--pipeline", help="passes to run first; its shard{dp,ep,tp,pp} pass is the parallel plan")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer.json (default: built-in bytes, 258 ids)")
    p.add_argument("--include", action="append", help="file-name glob taken from folders (default *)")
    p.add_argument("--exclude", action="append", default=[], help="skip folders/files matching this glob")
    p.add_argument("--max-bytes", type=float, help="read at most this many bytes of text")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, in sequences")
    p.add_argument(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="micro-batches per optimizer step (the --batch-size global batch is split into this many)",
    )
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (Muon and AdamW)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--optimizer", choices=("muon", "adamw"), default=d.optimizer)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--mtp-weight", type=float, default=d.mtp_weight)
    p.add_argument("--balance-loss", type=float, default=d.balance_loss, help="sequence balance loss weight")
    p.add_argument(
        "--bias-update-rate", type=float, default=d.bias_update_rate, help="loss-free balancing rate"
    )
    p.add_argument("--no-compile", action="store_true", help="run eagerly (fast start, for tests)")
    p.add_argument("--activation-checkpoint", action="store_true")
    # Shorthands for shard{dp=..,ep=..,tp=..,pp=..}: one plan, one meaning of each degree.
    p.add_argument("--dp", type=int, help="shard dp: replicas (default: the world size / (ep x tp x pp))")
    p.add_argument(
        "--ep",
        type=int,
        default=d.ep,
        help="shard ep: routed experts split; a data-parallel axis for the rest",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=d.tp,
        help="shard tp: attention heads, MLP and expert columns, vocabulary",
    )
    p.add_argument("--pp", type=int, default=d.pp, help="shard pp: pipeline stages")
    p.add_argument("--no-fsdp", action="store_true", help="replicate dense weights instead of FSDP2")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default=d.dtype)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint interval (0: at the end)")
    p.add_argument(
        "--resume",
        help="checkpoint folder, or 'auto' for the latest in the run folder (none there: a fresh start "
        "if the folder is empty, refused if it holds files)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="the run folder holds an earlier run: delete its contents and start over (not with --resume)",
    )
    p.add_argument("--no-export", action="store_true", help="skip the Hugging Face export at the end")
    p.add_argument("--peak-tflops", type=float, help="per-device peak for MFU (default: a stated guess)")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> object:
    from glmc.train.config import TrainConfig

    return TrainConfig(
        spec=args.spec,
        data=tuple(args.data),
        out=args.out,
        pipeline=args.pipeline,
        tokenizer=args.tokenizer,
        include=tuple(args.include or ["*"]),
        exclude=tuple(args.exclude),
        max_bytes=_whole(args.max_bytes),  # type: ignore[arg-type]  # TrainConfig refuses a non-whole value
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        grad_clip=args.grad_clip,
        mtp_weight=args.mtp_weight,
        balance_loss=args.balance_loss,
        bias_update_rate=args.bias_update_rate,
        compile=not args.no_compile,
        activation_checkpoint=args.activation_checkpoint,
        dp=args.dp,
        ep=args.ep,
        tp=args.tp,
        pp=args.pp,
        fsdp=not args.no_fsdp,
        dtype=args.dtype,
        seed=args.seed,
        log_every=args.log_every,
        save_every=args.save_every,
        resume=args.resume,
        export_hf=not args.no_export,
        peak_tflops=args.peak_tflops,
        progress=not args.no_progress,
        force=args.force,
    )


def _whole(v: float | None) -> int | float | None:
    """--max-bytes 1e6 -> 1000000; a value that is not a whole number goes to TrainConfig as
    it is, which refuses it naming the flag."""
    return int(v) if v is not None and math.isfinite(v) and v.is_integer() else v


def run(args: argparse.Namespace) -> int:
    from glmc.train import train
    from glmc.train.config import TrainConfig

    cfg = config_from_args(args)
    assert isinstance(cfg, TrainConfig)
    result = train(cfg)
    if result.records and os.environ.get("RANK", "0") == "0":
        first, last = result.records[0], result.records[-1]
        print(
            f"trained steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}; "
            f"run folder {result.run_dir}"
        )
    return EXIT_OK
