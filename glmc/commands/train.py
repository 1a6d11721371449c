"""Train the emitted model on local text with GLM-4.5's recipe (Muon + AdamW, MTP loss,
loss-free balancing). One process, or many under torchrun:

    glmc train glm-small --data corpus/ --steps 300
    torchrun --nproc_per_node=4 $(which glmc) train glm-tiny --data corpus/ --pipeline 'shard{ep=2,tp=2}'
"""

from __future__ import annotations

import argparse
import math
import os

from glmc.commands._common import EXIT_OK, add_spec_argument, human_bytes
from glmc.errors import GlmcError

NAME = "train"
HELP = "Train a spec on local text files (torchrun for several processes)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from glmc.train.config import TrainConfig

    d = TrainConfig()
    add_spec_argument(p)
    p.add_argument("--data", action="append", help="text or folder (repeatable; needed unless --dry-run)")
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
    dry = p.add_argument_group(
        "dry run (no data, no model allocated: every rank role's real sharded module stepped on fake tensors)"
    )
    dry.add_argument(
        "--dry-run",
        action="store_true",
        help="build and step each rank role of the plan on one CPU process under a fake process group; "
        "print per-rank parameter, gradient, optimizer and peak activation bytes next to glmc inspect's",
    )
    dry.add_argument("--world", type=int, help="with --dry-run: the launch's world (default: the plan's)")
    dry.add_argument("--device-memory", help="with --dry-run: memory of one device, e.g. 141GiB or 80GB")
    dry.add_argument("--json", action="store_true", help="with --dry-run: the report as JSON on stdout")


def config_from_args(args: argparse.Namespace) -> object:
    from glmc.train.config import TrainConfig

    return TrainConfig(
        spec=args.spec,
        data=tuple(args.data or ()),
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
    if args.dry_run:
        return _dry_run(cfg, args)
    for flag in ("world", "device_memory"):
        if getattr(args, flag) is not None:
            raise GlmcError(f"--{flag.replace('_', '-')} belongs to --dry-run")
    if not args.data:
        raise GlmcError("--data is required: the text files or folders to train on (or --dry-run)")
    result = train(cfg)
    if result.records and os.environ.get("RANK", "0") == "0":
        first, last = result.records[0], result.records[-1]
        print(
            f"trained steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}; "
            f"run folder {result.run_dir}"
        )
    return EXIT_OK


def parse_memory(text: str) -> int:
    """'141GiB' -> 141 * 2**30; also KiB, MiB, TiB, KB, MB, GB, TB and plain byte counts."""
    units = {
        "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
        "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    }  # fmt: skip
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num) :]]
    except (ValueError, KeyError):
        raise GlmcError(f"--device-memory {text!r} is not a size such as 141GiB, 80GB or 1048576") from None
    if not math.isfinite(value) or value < 1:
        raise GlmcError(f"--device-memory must be a positive size, got {text!r}")
    return int(value)


def _dry_run(cfg: object, args: argparse.Namespace) -> int:
    import json

    from glmc.train.dryrun import dry_run

    memory = parse_memory(args.device_memory) if args.device_memory is not None else None
    report = dry_run(cfg, world=args.world, device_memory=memory)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    d = report.as_dict()
    m = d["mesh"]
    t = Table(
        title=f"glmc train --dry-run: {d['name']}, pp={m['pp']} dp={m['dp']} ep={m['ep']} tp={m['tp']} "
        f"({d['world_size']} ranks); micro-batch {d['micro_batch']} x {d['seq_len']} tokens, "
        f"{d['microbatches']} per step, {d['activations']}",
        caption=f"measured on the real sharded modules (fake tensors) / IR prediction (glmc inspect); "
        f"{d['assumptions']}",
        header_style="bold",
    )
    for col in ("role", "ranks", "params", "grads", "optim", "act. peak", "peak", "fits"):
        t.add_column(col, justify="right")
    for r in d["roles"]:
        if not r["built"]:
            t.add_row(r["role"], str(r["ranks"]), f"not built: {r['note']}", "", "", "", "", "")
            continue
        mes, ir = r["measured"], r["ir"]

        def pair(key: str, mes: dict = mes, ir: dict = ir) -> str:
            same = "=" if mes[key] == ir[key] else "!="
            return f"{human_bytes(mes[key])} {same} {human_bytes(ir[key])}"

        fits = {True: "yes", False: "no", None: "-"}[r["fits"]]
        t.add_row(
            r["role"], str(r["ranks"]), pair("param_bytes"), pair("grad_bytes"), pair("optimizer_bytes"),
            human_bytes(mes["activation_peak_bytes"]), human_bytes(mes["peak_bytes"]), fits,
        )  # fmt: skip
    console = Console()
    console.print(t)
    console.print(
        f"per-rank bytes equal the IR's: {'yes' if d['ir_equal'] else 'NO'}; "
        f"dry run {d['seconds']:.1f} s, peak RSS {human_bytes(d['peak_rss_bytes'])}"
    )
    return EXIT_OK
