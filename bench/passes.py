"""Wall time of lowering and of pass pipelines on the GLM-4.5 spec (no weights).

The peer is lowering itself, measured in the same run: each pipeline's time is also printed as
a multiple of `lower` (spec -> verified IR), which a loaded machine slows down alike. Each row
gives the first (cold) run and the median of --repeat runs; the per-pass split (apply and
verify) is from the last run. The shard pass was asked to run the first pipeline below on
GLM-4.5 in under a second; a test used to assert that and flaked on loaded CI machines.

    python bench/passes.py [--spec glm-4.5] [--repeat 5] [--pipelines "P1;P2"]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

from glmc import presets
from glmc.ir import Graph
from glmc.lower import lower
from glmc.pipeline import PassRecord, build, run_passes
from glmc.spec import ModelSpec

PIPELINES = (
    "fuse-moe,shard{ep=64,pp=4,dp=2,redundant_experts=32},quantize-fp8",
    "fuse-moe,shard{ep=8,tp=2}",
    "shard{ep=4096,redundant_experts=65376}",  # the largest expert layout the shard pass accepts
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="glm-4.5", help="preset name (default glm-4.5)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per row; the median is printed")
    ap.add_argument("--pipelines", help="';'-separated pipelines (default: three GLM-4.5 plans)")
    args = ap.parse_args()
    spec = presets.get(args.spec)
    pipelines = [p for p in args.pipelines.split(";") if p] if args.pipelines else list(PIPELINES)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    lower_s = statistics.median(_time(lambda: lower(spec)) for _ in range(args.repeat))
    print(
        "\n| what | first s | median s | x lower |\n|---|---:|---:|---:|\n"
        f"| lower {args.spec} | | {lower_s:.3f} | 1.00 |"
    )
    splits: dict[str, list[PassRecord]] = {}
    for text in pipelines:
        records: list[PassRecord] = []

        def once(t: str = text, r: list[PassRecord] = records) -> Graph:
            return _pipeline(spec, t, r)

        # The first run is the cold one: the shard pass caches expert placements per process.
        runs = [_time(once) for _ in range(args.repeat)]
        splits[text] = records
        s = statistics.median(runs)
        print(f"| lower + `{text}` | {runs[0]:.3f} | {s:.3f} | {s / lower_s:.2f} |")
    print("\n| pipeline | pass | apply ms | verify ms |\n|---|---|---:|---:|")
    for text, records in splits.items():
        for r in records:
            print(f"| `{text}` | {r.spelling} | {r.seconds * 1e3:.1f} | {r.verify_seconds * 1e3:.1f} |")


def _pipeline(spec: ModelSpec, text: str, records: list[PassRecord]) -> Graph:
    records.clear()
    return run_passes(lower(spec), build(text), lambda _p, _g, rec: records.append(rec))


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
