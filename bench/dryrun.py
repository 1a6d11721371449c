"""Full-scale training dry runs on this machine: `glmc train --dry-run` (glmc.train.dryrun) for
GLM-4.5 at a 256-rank plan and GLM-4.5-Air at a 64-rank plan, each rank role built by the
trainer's own placement code on the meta device under a fake process group and stepped on fake
tensors. Prints per role the bytes held (parameters, gradients, optimizer state) next to the IR's
prediction (the peer: `glmc.ir.per_rank_memory`, timed in the same run), the step's peak and its
activation share, whether it fits the device, and for the whole dry run its wall time and peak
RSS (every process: the parent and each role's child) against the bytes one rank holds.

    python bench/dryrun.py [--plan SPEC:PIPELINE ...] [--seq 4096] [--micro 1] [--microbatches 4]
                           [--device-memory 141GiB] [--activation-checkpoint] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from glmc.api import resolve_spec
from glmc.commands._common import human_bytes
from glmc.commands.train import parse_memory
from glmc.ir import TrainingAssumptions, mesh_of, per_rank_memory
from glmc.pipeline import compile_graph
from glmc.train.config import TrainConfig
from glmc.train.dryrun import PARAM_KEYS, dry_run

# Training places the unfused model (fuse-moe only renames and stacks the same elements; the
# per-rank bytes of both graphs differ by AdamW's 4-byte step counters of the fused tensors).
PLANS = ("glm-4.5:shard{pp=4,ep=32,dp=2}", "glm-4.5-air:shard{pp=2,ep=16,dp=2}")


def run(spec_name: str, pipeline: str, args: argparse.Namespace, device_memory: int) -> dict[str, Any]:
    spec = resolve_spec(spec_name)
    t = time.perf_counter()
    graph = compile_graph(spec, pipeline)
    ir = per_rank_memory(graph, TrainingAssumptions.glmc_train("muon", True))
    ir_s = time.perf_counter() - t
    mesh = mesh_of(graph)
    data_ranks = mesh["dp"] * mesh["ep"]
    cfg = TrainConfig(
        spec=spec_name,
        pipeline=pipeline,
        seq_len=args.seq,
        batch_size=data_ranks * args.micro * args.microbatches,
        grad_accum=args.microbatches,
        activation_checkpoint=args.activation_checkpoint,
        compile=False,
    )
    report = dry_run(cfg, device_memory=device_memory)
    out = report.as_dict()
    out["ir_seconds"] = round(ir_s, 3)
    out["ir_per_rank"] = ir["per_rank"]
    print(
        f"\n{spec_name} {pipeline}: {report.world} ranks, micro-batch {report.micro_batch} x {args.seq} "
        f"tokens, {args.microbatches} micro-batches, {report.dtype}"
        + (", activation checkpointing" if args.activation_checkpoint else "")
    )
    head = f"{'role':>8} {'ranks':>5} {'params':>22} {'grads':>22} {'optimizer':>22} {'act. peak':>11} {'peak':>11} fits"
    print(head)
    for r in report.reports:
        if not r.built:
            print(f"{r.role.describe():>8} {r.role.ranks:>5} not built: {r.note}")
            continue
        m, p = r.measured, r.ir
        cells = [
            f"{human_bytes(m[k])} {'=' if m[k] == p[k] else '!='} {human_bytes(p[k])}" for k in PARAM_KEYS
        ]
        fits = {True: "yes", False: "no", None: "-"}[r.fits(device_memory)]
        print(
            f"{r.role.describe():>8} {r.role.ranks:>5} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22} "
            f"{human_bytes(m['activation_peak_bytes']):>11} {human_bytes(m['peak_bytes']):>11} {fits}"
        )
        exact = ", ".join(f"{k} {m[k]:,}" for k in PARAM_KEYS)
        print(f"{'':>14} bytes: {exact} (IR equal: {r.equal}); role {r.seconds:.1f} s")
    held = max(sum(r.measured[k] for k in PARAM_KEYS) for r in report.reports if r.built)
    print(
        f"equal to the IR's per-rank bytes: {report.equal}; dry run {report.seconds:.1f} s "
        f"(IR prediction {ir_s:.2f} s); peak RSS {human_bytes(report.peak_rss_bytes)} = "
        f"{report.peak_rss_bytes / held:.4f} x the training state one rank holds ({human_bytes(held)})"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="append", help="SPEC:PIPELINE (default: the two plans of PLANS)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=1, help="sequences per micro-batch per data-parallel rank")
    ap.add_argument("--microbatches", type=int, default=4, help="micro-batches per step (>= pp)")
    ap.add_argument("--device-memory", default="141GiB")
    ap.add_argument(
        "--activation-checkpoint", action="store_true", help="glmc train's --activation-checkpoint"
    )
    ap.add_argument("--json", help="also write the reports to this file")
    args = ap.parse_args()
    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load[0]:.1f} at start; "
        f"torch fake process group + FakeTensorMode + MemTracker"
    )
    memory = parse_memory(args.device_memory)
    results = []
    for plan in args.plan or PLANS:
        spec_name, pipeline = plan.split(":", 1)
        results.append(run(spec_name, pipeline, args, memory))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
