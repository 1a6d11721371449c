"""Training throughput: glmc's compiled training step vs transformers' Glm4MoeForCausalLM eager
training step, on CPU (fp32) or on a CUDA GPU (`--device cuda`: bf16 autocast on both sides, as
glmc's trainer does on GPU; glmc's MoE then runs the Triton kernels).

Same config (the preset without MTP: transformers' model has no MTP layer to train), same
weights (glmc writes the checkpoint, transformers loads it), same batch, same optimiser settings
(AdamW, lr 1e-4, weight decay 0.01, betas 0.9/0.999). One step = forward, next-token
cross-entropy, backward, optimiser step. glmc's step is the trainer's own: the module from
`glmc.train.parallel.parallelize` (per-block torch.compile(fullgraph=True); routers count tokens
for loss-free balancing) and the AdamW that `glmc.train.optim.build_optimizers` makes (fused);
transformers' is `torch.optim.AdamW` with its defaults, what its Trainer's `adamw_torch` uses.
Prints tokens/s for both and the ratio.

On CPU it then profiles one step of each and splits glmc's step into the time spent inside GEMM and
attention kernels (aten mm/addmm/bmm, the per-expert mm of `_grouped_mm`, SDPA forward and
backward: MKL and oneDNN code, the same calls transformers makes) and everything else. The
ratio transformers step / glmc's GEMM+attention time is the most any rewrite of the rest could
reach at this FLOP count on this machine; it is printed as "bound".

    python bench/train.py [--preset glm-small] [--batch 4] [--seq 256] [--steps 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from _peer import glmc_and_transformers  # bench/ is the script's folder

import glmc


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_times(step: Callable[[], None], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        _sync()
        t = time.perf_counter()
        step()
        _sync()
        out.append(time.perf_counter() - t)
    return out


# Kernels both sides call into the same libraries for (MKL GEMMs, oneDNN/ATen flash attention).
_LIBRARY_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def library_seconds(step: Callable[[], None], steps: int = 2) -> float:
    """Per-step seconds spent inside GEMM and attention kernels (profiler self time)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    us = sum(
        e.self_cpu_time_total
        for e in prof.key_averages()
        if e.key in _LIBRARY_OPS or e.key.startswith("aten::_scaled_dot_product")
    )
    return us / steps / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-compile", action="store_true", help="time glmc eager instead")
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/train.py: --device cuda needs a CUDA GPU")
    bf16 = device.type == "cuda"

    def autocast() -> AbstractContextManager[Any]:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    torch.set_num_threads(args.threads)
    import transformers

    from glmc.train.config import TrainConfig
    from glmc.train.optim import build_optimizers
    from glmc.train.parallel import parallelize
    from glmc.train.plan import Dist, ParallelPlan

    spec = glmc.presets.get(args.preset).model_copy(update={"num_mtp_layers": 0})
    ours, hf = glmc_and_transformers(spec, seed=0)
    ours, hf = ours.to(device), hf.to(device)
    hf.train()
    ours.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = ids[:, :-1], ids[:, 1:]

    single = Dist(0, 1, 0, device, ParallelPlan())
    module = parallelize(ours, single, compile=not args.no_compile, activation_checkpoint=False, fsdp=False)  # type: ignore[arg-type]
    cfg = TrainConfig(optimizer="adamw", lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999))
    (opt_ours,) = build_optimizers(module, cfg)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def step_ours() -> None:
        with autocast():
            logits, _, _ = module(x)
            loss = ce(logits.float())
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf() -> None:
        with autocast():
            loss = ce(hf(x).logits.float())
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step_ours()  # cold compile
    compile_s = time.perf_counter() - t0
    # Interleave the two so background load on a shared machine hits both alike.
    t_ours: list[float] = []
    t_hf: list[float] = []
    for _ in range(2):
        t_hf += step_times(step_hf, args.steps // 2, warmup=1)
        t_ours += step_times(step_ours, args.steps // 2, warmup=1)
    on_cpu = device.type == "cpu"
    lib_hf, lib_ours = (library_seconds(step_hf), library_seconds(step_ours)) if on_cpu else (0.0, 0.0)
    tokens = args.batch * args.seq
    m_ours, m_hf = statistics.median(t_ours), statistics.median(t_hf)
    label = "glmc eager" if args.no_compile else "glmc compiled"
    print(f"# glmc vs transformers {transformers.__version__} Glm4MoeForCausalLM, torch {torch.__version__}")
    where = (
        torch.cuda.get_device_name(device) if not on_cpu else f"{platform.machine()}, {args.threads} threads"
    )
    print(
        f"# {where}; preset {args.preset} without MTP ({glmc.inspect(spec)['params']['total'] / 1e6:.1f}M params), "
        f"batch {args.batch} x seq {args.seq}, {'bf16 autocast' if bf16 else 'fp32'}, AdamW"
    )
    print(
        f"# experts_implementation (transformers): {getattr(hf.config, '_experts_implementation', 'default')}"
    )
    print(f"# {label}: first step (cold compile) {compile_s:.1f} s; medians of {len(t_ours)} steps")
    print(f"| step | transformers eager ms | {label} ms | transformers tok/s | glmc tok/s | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| fwd+bwd+AdamW | {m_hf * 1e3:.1f} | {m_ours * 1e3:.1f} | {tokens / m_hf:,.0f} | "
        f"{tokens / m_ours:,.0f} | {m_hf / m_ours:.2f}x |"
    )
    if not on_cpu:
        return
    print()
    print("| side | step ms | in GEMM + attention kernels ms | everything else ms |")
    print("|---|---:|---:|---:|")
    for side, m, lib in (("transformers eager", m_hf, lib_hf), (label, m_ours, lib_ours)):
        print(f"| {side} | {m * 1e3:.1f} | {lib * 1e3:.1f} | {max(0.0, m - lib) * 1e3:.1f} |")
    print(
        f"bound: transformers step / glmc GEMM+attention time = {m_hf / lib_ours:.2f}x "
        "(the speedup if everything else in glmc's step took no time)"
    )


if __name__ == "__main__":
    main()
