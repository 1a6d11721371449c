"""Print the IR of a spec after a pipeline of passes (verified after every pass).

`--print-after all` prints the graph after lowering and after each pass, each preceded by a
`// ----- IR after <pass> -----` line; `--time-passes` reports each pass's time on stderr."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from glmc.commands._common import EXIT_OK, add_spec_argument
from glmc.errors import GlmcError

NAME = "ir"
HELP = "Print the IR of a spec after a pipeline of passes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_argument(p)
    p.add_argument("--pipeline", default="", help="passes, e.g. 'fuse-moe,shard{ep=8,tp=2},quantize-fp8'")
    p.add_argument(
        "--print-after",
        metavar="PASS",
        help="also print the IR after this pass ('all': after lowering and after every pass)",
    )
    p.add_argument("--time-passes", action="store_true", help="report each pass's time on stderr")
    p.add_argument("--dtype", default="bf16", help="weight dtype of the graph (default bf16)")


def run(args: argparse.Namespace) -> int:
    from glmc.ir import format_graph
    from glmc.pipeline import PassRecord, build, compile_graph, run_passes
    from glmc.resolve import resolve_spec

    passes = build(args.pipeline)  # a bad pipeline fails before anything is printed
    names = {p.name for p in passes}
    if args.print_after not in (None, "all") and args.print_after not in names:
        raise GlmcError(
            f"--print-after {args.print_after}: not a pass of the pipeline ({', '.join(sorted(names)) or 'none'})"
        )
    t0 = time.perf_counter()
    try:
        graph = compile_graph(resolve_spec(args.spec), dtype=args.dtype)  # lowered, no pass yet
    except ValueError as e:
        raise GlmcError(f"--dtype: {e}") from None
    lowered = time.perf_counter() - t0
    if args.print_after == "all":
        sys.stdout.write(f"// ----- IR after lower -----\n{format_graph(graph)}")
    records: list[PassRecord] = []

    def observe(p: Any, g: Any, rec: PassRecord) -> None:
        records.append(rec)
        if args.print_after in ("all", p.name) and p is not passes[-1]:
            sys.stdout.write(f"// ----- IR after {rec.spelling} -----\n{format_graph(g)}")

    graph = run_passes(graph, passes, observe)
    if args.print_after is not None and passes:
        sys.stdout.write(f"// ----- IR after {passes[-1].spelling()} -----\n")
    sys.stdout.write(format_graph(graph))
    if args.time_passes:
        _report(lowered, len(graph.nodes) if not records else records[0].nodes_before, records)
    return EXIT_OK


def _report(lowered: float, lowered_nodes: int, records: list[Any]) -> None:
    err = sys.stderr
    print(f"{'pass':<52} {'apply ms':>9} {'verify ms':>10} {'nodes':>11}", file=err)
    print(f"{'lower (spec -> IR, verified)':<52} {lowered * 1e3:9.1f} {'':>10} {lowered_nodes:>11}", file=err)
    for r in records:
        nodes = f"{r.nodes_before}->{r.nodes_after}"
        print(f"{r.spelling:<52} {r.seconds * 1e3:9.1f} {r.verify_seconds * 1e3:10.1f} {nodes:>11}", file=err)
    total = lowered + sum(r.seconds + r.verify_seconds for r in records)
    print(f"{'total':<52} {total * 1e3:9.1f}", file=err)
