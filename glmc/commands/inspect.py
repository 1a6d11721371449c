"""Parameter counts, FLOPs and KV-cache bytes of a spec."""

from __future__ import annotations

import argparse
import json

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


def run(args: argparse.Namespace) -> int:
    from glmc.api import compile_graph, inspect, resolve_spec

    if args.seq_len <= 0:
        raise GlmcError(f"--seq-len must be positive, got {args.seq_len}")
    info = inspect(args.spec, pipeline=args.pipeline, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    console = Console()
    p, f, kv = info["params"], info["flops_per_token"], info["kv_cache_bytes_per_token"]
    t = Table(title=f"glmc inspect: {info['name']}", show_header=True, header_style="bold")
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
    if args.ir:
        from glmc.ir import format_graph

        print(format_graph(compile_graph(resolve_spec(args.spec), args.pipeline)))
    return EXIT_OK
