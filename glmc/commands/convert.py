"""Stream a checkpoint into the layout a pipeline describes (fused, FP8, per-rank shards).

SRC is a Hugging Face layout folder or an unsharded folder glmc wrote. Memory stays at about
one output tensor plus one input piece; OUT appears only when complete."""

from __future__ import annotations

import argparse
from pathlib import Path

from glmc.commands._common import EXIT_OK
from glmc.errors import GlmcError

NAME = "convert"
HELP = "Stream a checkpoint into the layout a pipeline describes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="Hugging Face layout folder (or an unsharded glmc convert output)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument(
        "--pipeline",
        default="",
        help="e.g. 'fuse-moe,shard{ep=8},quantize-fp8{recipe=block128}' (default: none)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="dtype of the unquantised weights: auto, bf16, f16 or f32 (default auto: as stored; a checkpoint "
        "of mixed dtypes follows the dtype most of its weight elements are stored in)",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="copy weights holding NaN or Inf (refused by default, naming the tensor; FP8 never takes them)",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from glmc.convert import convert
    from glmc.outdir import terminate_raises

    size = parse_size(args.max_shard_size)
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[tensor]}"),
    )
    bar = Progress(*columns, console=console, disable=args.quiet)
    task = bar.add_task("converting", total=None, tensor="")

    def progress(done: int, total: int, name: str) -> None:
        if not bar.live.is_started:  # only once data flows: a refused input prints just its error
            bar.start()
        bar.update(task, completed=done, total=total, tensor=name)

    # SIGTERM unwinds like Ctrl-C, so the temporary output folder is removed.
    try:
        with terminate_raises():
            r = convert(args.src, args.out, args.pipeline, args.dtype, size, args.force, progress,
                        allow_nonfinite=args.allow_nonfinite)  # fmt: skip
    finally:
        bar.stop()
    for note in r.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    mb = r["bytes_written"] / 1e6
    where = f" in {r['ranks']} rank folders" if r["ranks"] > 1 else ""
    quant = f", FP8 {r['quantization']}" if r["quantization"] else ""
    extra = f"; {len(r['sidecars'])} tokenizer/generation file(s) carried" if r["sidecars"] else ""
    console.print(
        f"[green]converted[/] {args.src} -> {args.out}: {r['tensors']} tensors, {mb:,.1f} MB{where} "
        f"({r['weight_layout']} layout{quant}; {r['seconds']:.1f} s, {mb / max(r['seconds'], 1e-9):,.0f} MB/s)"
        f"{extra}"
    )
    return EXIT_OK


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; also KB, MB, KiB, MiB, GiB and plain byte counts."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = int(float(num) * units[t[len(num) :]])
    except (ValueError, KeyError):
        raise GlmcError(f"--max-shard-size {text!r} is not a size such as 5GB, 500MB or 1048576") from None
    if value <= 0:
        raise GlmcError(f"--max-shard-size must be positive, got {text!r}")
    return value
