"""The `glmc` command line. Exit codes: 0 success, 2 bad input (one clear message on stderr, no
traceback), 1 internal error."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glmc import presets
from glmc.errors import GlmcError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2

SPEC_HELP = (
    f"a preset ({', '.join(presets.names())}), a YAML/JSON spec file, a Hugging Face config.json, "
    f"or a checkpoint folder (default: {presets.DEFAULT})"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own usage errors are bad input too
        self.print_usage(sys.stderr)
        print(f"glmc: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="glmc", description="A compiler for GLM-4.5-class Mixture-of-Experts models.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    q = sub.add_parser("inspect", help="parameter counts, FLOPs and KV-cache bytes of a spec")
    q.add_argument("spec", nargs="?", default=presets.DEFAULT, help=SPEC_HELP)
    q.add_argument("--pipeline", help="passes to run first, e.g. 'fuse-moe,shard{ep=8}'")
    q.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    q.add_argument(
        "--seq-len", type=int, default=4096, help="context length for attention FLOPs (default 4096)"
    )
    q.add_argument("--ir", action="store_true", help="also print the IR graph")

    b = sub.add_parser("build", help="compile a spec and emit artifacts")
    b.add_argument("spec", nargs="?", default=presets.DEFAULT, help=SPEC_HELP)
    b.add_argument("-o", "--out", required=True, type=Path, help="output folder (written atomically)")
    b.add_argument("--pipeline", help="passes to run before emitting")
    b.add_argument("--weights", type=Path, help="Hugging Face checkpoint folder; random init when absent")
    b.add_argument(
        "--emit", default="torch,hf", help="comma-separated targets: torch, hf (default: torch,hf)"
    )
    b.add_argument("--seed", type=int, default=0, help="seed for random init (default 0)")
    b.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    b.add_argument(
        "--dtype", default="bf16", help="weight dtype of the artifacts: bf16, f16 or f32 (default bf16)"
    )

    s = sub.add_parser("schema", help="print the JSON schema of the model spec")
    s.add_argument("-o", "--out", type=Path, help="write to this file instead of stdout")

    sub.add_parser("presets", help="list the built-in presets")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already reported by argparse
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        if args.version:
            from glmc import __version__

            print(__version__)
            return EXIT_OK
        if args.command is None:
            _parser().print_help()
            return EXIT_BAD_INPUT
        return int(_COMMANDS[args.command](args))
    except GlmcError as e:
        print(f"glmc: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("glmc: interrupted", file=sys.stderr)
        return 130


def _cmd_inspect(args: argparse.Namespace) -> int:
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
        ("params.total", _n(p["total"]), "paper rule: MTP in, embeddings and head out"),
        ("params.active", _n(p["active"]), "per token: top-k routed experts"),
        ("params.checkpoint", _n(p["checkpoint"]), "every tensor a full checkpoint holds"),
        ("params.in_memory", _n(p["in_memory"]), "what a model instance holds"),
        ("params.mtp", _n(p["mtp"]), "MTP layers (in total)"),
        (f"flops/token fwd @ {f['seq_len']}", _n(f["forward"]), "trunk + head"),
        (f"flops/token train @ {f['seq_len']}", _n(f["training"]), "3x fwd, MTP included"),
        ("kv-cache bytes/token", f"{kv['trunk']:,}", f"trunk, {kv['dtype_bytes']}-byte K/V"),
        ("weight bytes", _n(info["weight_bytes"]), "at storage dtype"),
    ]
    for r in rows:
        t.add_row(*r)
    console.print(t)
    if args.ir:
        from glmc.ir import format_graph

        print(format_graph(compile_graph(resolve_spec(args.spec), args.pipeline)))
    return EXIT_OK


def _cmd_build(args: argparse.Namespace) -> int:
    from rich.console import Console

    from glmc.api import build

    console = Console(stderr=True)
    emit = [t.strip() for t in args.emit.split(",") if t.strip()]
    with console.status("building") as status:
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
        )
    p = manifest["summary"]["params"]
    console.print(
        f"[green]built[/] {manifest['spec']['name']} -> {args.out} "
        f"(targets: {', '.join(manifest['targets'])}; {_n(p['total'])} params, {_n(p['active'])} active)"
    )
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from glmc.spec import ModelSpec

    text = json.dumps(ModelSpec.model_json_schema(), indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_presets(args: argparse.Namespace) -> int:
    from glmc.api import inspect

    for name in presets.names():
        p = inspect(name)["params"]
        print(f"{name:14s} {_n(p['total']):>10s} total  {_n(p['active']):>10s} active")
    return EXIT_OK


_COMMANDS = {"inspect": _cmd_inspect, "build": _cmd_build, "schema": _cmd_schema, "presets": _cmd_presets}


def _n(x: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


if __name__ == "__main__":
    raise SystemExit(main())
