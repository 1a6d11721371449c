"""Peak memory and throughput of `glmc convert` on synthetic checkpoints of two sizes.

Writes two synthetic bf16 Hugging Face checkpoints under --tmp (a GLM-shaped spec whose layers
are ~110 MB each: --layers and twice as many), converts each in a fresh process, and reports
each conversion's peak resident memory (VmHWM of the converting process, which counts mapped
file pages too; not ru_maxrss, which Linux carries over from the forking parent) and MB/s. The peer is the non-streaming way, in the same run: `safetensors.torch.load_file` every
shard, then `save_file` (the whole checkpoint in memory). Streaming should stay flat as the
checkpoint doubles; the peer grows with it. Everything under --tmp is deleted at the end.

    python bench/convert.py [--layers 20] [--tmp /tmp] [--pipelines "fuse-moe,quantize-fp8;"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from glmc.spec import ModelSpec


def spec(layers: int) -> ModelSpec:
    return ModelSpec.from_dict(
        {
            "name": f"synthetic-{layers}",
            "vocab_size": 32000,
            "hidden_size": 1024,
            "num_layers": layers,
            "num_dense_layers": 1,
            "attention": {"num_heads": 16, "num_kv_heads": 4, "head_dim": 64, "qk_norm": True},
            "mlp": {"intermediate_size": 2816},
            "moe": {"num_experts": 32, "top_k": 4, "intermediate_size": 512, "routed_scaling_factor": 2.5},
            "num_mtp_layers": 1,
        }
    )


def write_synthetic(layers: int, out: Path) -> int:
    """A random bf16 checkpoint in the Hugging Face layout, 1 GB shards; returns its bytes."""
    from glmc.export.hf import Planned, StreamingWriter, hf_tensors
    from glmc.export.hf.target import write_config
    from glmc.pipeline import compile_graph

    s = spec(layers)
    graph = compile_graph(s)
    plan = [Planned(t.name, t.shape, t.safetensors_dtype) for t in hf_tensors(graph)]
    writer = StreamingWriter(out, plan, max_shard_bytes=10**9)
    gen = torch.Generator().manual_seed(0)
    for p in plan:
        dt = torch.float32 if p.dtype == "F32" else torch.bfloat16
        writer.write(p.name, torch.empty(p.shape, dtype=dt).uniform_(-0.05, 0.05, generator=gen))
    writer.finish()
    write_config(s.to_hf_config(), graph, out)
    return sum(p.nbytes for p in plan)


def _child(mode: str, src: str, out: str, pipeline: str) -> None:
    """Runs in a fresh process; prints one JSON line."""
    if mode == "glmc":
        from glmc.convert import convert

        base = _rss_kb()
        t = time.perf_counter()
        r = convert(src, out, pipeline)
        seconds = time.perf_counter() - t
        written = r["bytes_written"]
    else:  # the peer: everything in memory at once
        from safetensors.torch import load_file, save_file

        base = _rss_kb()
        t = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(Path(src).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        Path(out).mkdir()
        save_file(tensors, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
        seconds = time.perf_counter() - t
        written = sum(v.numel() * v.element_size() for v in tensors.values())
    peak = _status_kb("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_kb": peak, "base_kb": base, "written": written}))


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _rss_kb() -> int:
    return _status_kb("VmRSS")


def _run(mode: str, src: Path, out: Path, pipeline: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, str(src), str(out), pipeline]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--layers", type=int, default=20, help="layers of the smaller checkpoint (default 20: ~2.3 GB)"
    )
    ap.add_argument("--tmp", default="/tmp", help="where to write the synthetic checkpoints")
    ap.add_argument("--pipelines", default="fuse-moe,quantize-fp8;", help="';'-separated pipelines to time")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    free = shutil.disk_usage(args.tmp).free
    need = 4 * 110e6 * 3 * args.layers  # both checkpoints, plus the largest output beside them
    if free < need:
        sys.exit(f"{args.tmp} has {free / 1e9:.1f} GB free; this run needs about {need / 1e9:.1f} GB")
    root = Path(tempfile.mkdtemp(prefix="glmc-bench-convert-", dir=args.tmp))
    rows = []
    try:
        for layers in (args.layers, 2 * args.layers):
            src = root / f"src-{layers}"
            t = time.perf_counter()
            size = write_synthetic(layers, src)
            print(f"wrote {src} ({size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            runs = [("glmc convert", p) for p in args.pipelines.split(";")] + [
                ("peer: load_file + save_file", "")
            ]
            for name, pipeline in runs:
                r = _run("glmc" if name.startswith("glmc") else "peer", src, root / "out", pipeline)
                rows.append((name, pipeline or "(none: re-emit)", size, r))
                print(f"  {name} [{pipeline}]: {r}", file=sys.stderr)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}"
    )
    print("| method | pipeline | checkpoint GB | peak RSS MB | RSS above imports MB | seconds | MB/s read |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, pipeline, size, r in rows:
        peak, base = r["peak_kb"] / 1024, r["base_kb"] / 1024
        print(
            f"| {name} | `{pipeline}` | {size / 1e9:.2f} | {peak:,.0f} | {peak - base:,.0f} | "
            f"{r['seconds']:.1f} | {size / 1e6 / r['seconds']:,.0f} |"
        )


if __name__ == "__main__":
    main()
