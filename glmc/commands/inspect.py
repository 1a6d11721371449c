"""Parameter counts, FLOPs and KV-cache bytes of a spec."""

from __future__ import annotations

import argparse
import json
from typing import Any

from glmc.commands._common import EXIT_OK, add_spec_argument, human, human_bytes
from glmc.errors import GlmcError

NAME = "inspect"
HELP = "Parameter counts, FLOPs and KV-cache bytes of a spec"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_argument(p)
    p.add_argument("--pipeline", help="passes to run first, e.g. 'fuse-moe,shard{ep=8}'")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    p.add_argument(
        "--seq-len", type=int, default=4096, help="context length for attention FLOPs (default 4096)"
    )
    p.add_argument("--ir", action="store_true", help="also print the IR graph")
    t = p.add_argument_group("training-state assumptions (per-rank memory, with a shard pass in --pipeline)")
    t.add_argument("--grad-dtype", default="f32", help="gradient dtype (default f32)")
    t.add_argument("--master-dtype", default="f32", help="master-weight dtype, or 'none' (default f32)")
    t.add_argument("--optimizer-dtype", default="f32", help="optimizer-state dtype (default f32)")
    t.add_argument(
        "--optimizer-states",
        type=int,
        default=2,
        help="optimizer states per parameter (default 2: Adam m, v)",
    )
    t.add_argument(
        "--shard-optimizer",
        action="store_true",
        help="ZeRO-1: split master weights and optimizer states over the data-parallel replicas",
    )
    t.add_argument("--kv-dtype", help="KV-cache dtype (default: the model dtype)")
    t.add_argument(
        "--train",
        action="store_true",
        help="what `glmc train` holds: f32 weights and grads, no master copy, Muon momentum (AdamW m, v "
        "and step for embedding, head, norms, biases), FSDP2 over dp x ep; replaces the dtype options",
    )
    t.add_argument(
        "--optimizer",
        choices=("muon", "adamw"),
        default="muon",
        help="with --train: glmc train's --optimizer",
    )
    t.add_argument("--no-fsdp", action="store_true", help="with --train: glmc train's --no-fsdp")


def run(args: argparse.Namespace) -> int:
    from glmc.api import compile_graph, inspect, resolve_spec

    if args.seq_len <= 0:
        raise GlmcError(f"--seq-len must be positive, got {args.seq_len}")
    info = inspect(args.spec, pipeline=args.pipeline, seq_len=args.seq_len, training=_training(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from glmc.untrusted import printable

    console = Console()
    p, f, kv = info["params"], info["flops_per_token"], info["kv_cache_bytes_per_token"]
    # The name is validated printable; escape it for rich too, where `[...]` is markup.
    title = f"glmc inspect: {escape(printable(info['name']))}"
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("note")
    rows = [
        ("params.total", human(p["total"]), "paper rule: MTP in, embeddings and head out"),
        ("params.active", human(p["active"]), "per token: top-k routed experts"),
        ("params.checkpoint", human(p["checkpoint"]), "every tensor a full checkpoint holds"),
        ("params.in_memory", human(p["in_memory"]), "what a model instance holds"),
        ("params.mtp", human(p["mtp"]), "MTP layers (in total)"),
        (f"flops/token fwd @ {f['seq_len']}", human(f["forward"]), "trunk + head"),
        (f"flops/token train @ {f['seq_len']}", human(f["training"]), "3x fwd, MTP included"),
        ("kv-cache bytes/token", f"{kv['trunk']:,}", f"trunk, {kv['dtype_bytes']}-byte K/V"),
        ("weight bytes", human_bytes(info["weight_bytes"]), "at storage dtype"),
    ]
    for r in rows:
        t.add_row(*r)
    console.print(t)
    if "parallel" in info:
        console.print(_parallel_table(info["parallel"]))
    if args.ir:
        from glmc.ir import format_graph

        print(format_graph(compile_graph(resolve_spec(args.spec), args.pipeline)))
    return EXIT_OK


def _training(args: argparse.Namespace) -> Any:
    from glmc.ir import DType, TrainingAssumptions

    def dtype(flag: str, value: str) -> DType:
        try:
            return DType.parse(value)
        except ValueError as e:
            raise GlmcError(f"--{flag}: {e}") from None

    if args.train:
        return TrainingAssumptions.glmc_train(args.optimizer, fsdp=not args.no_fsdp)
    if args.optimizer_states < 0:
        raise GlmcError(f"--optimizer-states must be >= 0, got {args.optimizer_states}")
    return TrainingAssumptions(
        grad=dtype("grad-dtype", args.grad_dtype),
        master=None if args.master_dtype == "none" else dtype("master-dtype", args.master_dtype),
        optimizer=dtype("optimizer-dtype", args.optimizer_dtype),
        optimizer_states=args.optimizer_states,
        shard_optimizer=args.shard_optimizer,
        kv=dtype("kv-dtype", args.kv_dtype) if args.kv_dtype else None,
    )


def _parallel_table(par: dict[str, Any]) -> Any:
    """Per-stage, per-rank memory of a sharded plan."""
    from rich.table import Table

    mesh, a = par["mesh"], par["assumptions"]
    t = Table(
        title=f"per-rank memory: pp={mesh['pp']} dp={mesh['dp']} ep={mesh['ep']} tp={mesh['tp']} "
        f"({par['world_size']} ranks)",
        caption=f"training state: grads {a['grad']}, master {a['master']}, optimizer {a['optimizer']}"
        f"{', ZeRO-1' if a['shard_optimizer'] else ''}; activations not counted",
        header_style="bold",
    )
    # Short headers: the table fits 80 columns (bytes in GiB/MiB, KV in bytes per token).
    for col in ("stage", "layers", "params", "weights", "grads", "optim", "train", "KV/tok"):
        t.add_column(col, justify="right")
    for s in par["stages"]:
        t.add_row(
            str(s["stage"]),
            f"{s['layers'][0]}-{s['layers'][1]}" + (" +MTP" if s["mtp_layers"] else ""),
            human(s["params"]),
            human_bytes(s["param_bytes"]),
            human_bytes(s["grad_bytes"]),
            human_bytes(s["master_bytes"] + s["optimizer_bytes"]),
            human_bytes(s["training_bytes"]),
            f"{s['kv_cache_bytes_per_token'] + s['mtp_kv_cache_bytes_per_token']:,}",
        )
    return t
