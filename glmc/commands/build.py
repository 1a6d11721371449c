"""Compile a spec and emit artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path

from glmc.commands._common import EXIT_OK, add_spec_argument, human
from glmc.export import names as target_names

NAME = "build"
HELP = "Compile a spec and emit artifacts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_argument(p)
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--pipeline", help="passes to run before emitting")
    p.add_argument(
        "--weights",
        type=Path,
        help="checkpoint folder (Hugging Face layout or a glmc convert output); random init when absent. Its "
        "tokenizer, chat template and generation files are carried into the hf, trtllm and onnx folders",
    )
    p.add_argument(
        "--emit",
        default="torch,hf",
        help=f"comma-separated targets: {', '.join(target_names())} (default: torch,hf); a pass a target "
        "cannot honour is refused before any work",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random init (default 0)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--dtype",
        default="auto",
        help="weight dtype of the artifacts: auto, bf16, f16 or f32 (default auto: the --weights checkpoint's "
        "dtype, for a checkpoint of mixed dtypes the one most of its weight elements are stored in; bf16 for "
        "random init)",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="keep --weights tensors holding NaN or Inf (refused by default, naming the tensor)",
    )
    p.add_argument(
        "--trtllm-version",
        help="TensorRT-LLM release the trtllm options are written for (1.1, 1.2; default: the newest): "
        "only that release's llm_args fields are used",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from glmc.api import build
    from glmc.outdir import terminate_raises

    console = Console(stderr=True)
    emit = [t.strip() for t in args.emit.split(",") if t.strip()]
    # SIGTERM unwinds like Ctrl-C, so the temporary output folder is removed.
    with terminate_raises(), console.status("building") as status:
        manifest = build(
            args.spec,
            args.out,
            pipeline=args.pipeline,
            weights=args.weights,
            emit=emit,
            seed=args.seed,
            force=args.force,
            dtype=args.dtype,
            progress=lambda msg: status.update(msg),
            allow_nonfinite=args.allow_nonfinite,
            trtllm_version=args.trtllm_version,
        )
    for note in manifest.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    p = manifest["summary"]["params"]
    console.print(
        f"[green]built[/] {manifest['spec']['name']} -> {args.out} "
        f"(targets: {', '.join(manifest['targets'])}; {human(p['total'])} params, {human(p['active'])} active)"
    )
    return EXIT_OK
