"""Check every glmc kernel against its reference and time it at GLM-4.5 shapes.

    python bench/kernels.py                  # CUDA GPU: hidden 5120, expert 1536, 160 experts, top-8
    python bench/kernels.py --tokens 1 64    # a subset of the token counts
    python bench/kernels.py --cpu-smoke      # tiny shapes on CPU, Triton interpreter: shows it runs

Peers measured in the same run: the MoE against `torch._grouped_mm` plus torch permutes
(argsort, gather, index_add), the router and the align against their torch references, the FP8
GEMMs against bf16 `torch.mm` / `torch._grouped_mm`. Each row prints time, TFLOP/s, the fraction
of the bf16 matmul peak measured at the start (8192^3 `torch.mm`), and the ratio to its peer
(> 1: glmc is faster). Exit status: 0 all checks pass, 1 a check failed, 2 no CUDA (without
--cpu-smoke).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GLM45 = {"hidden": 5120, "inter": 1536, "experts": 160, "top_k": 8, "n_group": 1, "topk_group": 1}
SMOKE = {"hidden": 64, "inter": 32, "experts": 8, "top_k": 2, "n_group": 2, "topk_group": 1}
GLM45_TOKENS = (1, 64, 4096, 16384)
SMOKE_TOKENS = (1, 16)


@dataclass
class Row:
    name: str
    tokens: int
    ms: float
    flops: float
    peer: str = ""
    peer_ms: float = 0.0
    check: str = ""


class Bench:
    def __init__(self, device: Any, iters: int, warmup: int) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.iters = iters
        self.warmup = warmup
        self.rows: list[Row] = []
        self.failures: list[str] = []
        self.peak = 0.0

    def time(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds per call."""
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            for _ in range(self.iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def measure_peak(self, n: int) -> None:
        torch = self.torch
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        ms = self.time(lambda: torch.mm(a, b))
        self.peak = 2 * n**3 / ms / 1e9
        print(f"measured {dtype} matmul peak: {self.peak:.1f} TFLOP/s ({n}^3 torch.mm, {ms:.3f} ms)")

    def check(self, name: str, ok: bool, detail: str) -> str:
        if not ok:
            self.failures.append(f"{name}: {detail}")
        return ("ok " if ok else "FAIL ") + detail

    def add(self, row: Row) -> None:
        self.rows.append(row)
        tflops = row.flops / row.ms / 1e9 if row.ms > 0 else 0.0
        frac = tflops / self.peak if self.peak else 0.0
        ratio = f"{row.peer_ms / row.ms:6.2f}x vs {row.peer}" if row.peer else ""
        print(
            f"{row.name:<28} T={row.tokens:<6} {row.ms:9.3f} ms {tflops:8.1f} TFLOP/s {frac:6.1%} of peak  "
            f"{ratio:<34} {row.check}",
            flush=True,
        )


def rel_err(a: Any, b: Any) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def baseline_moe(x: Any, gate_up: Any, down: Any, ids: Any, weights: Any) -> Any:
    """The peer: argsort permute + torch._grouped_mm x2 + index_add unpermute."""
    import torch
    import torch.nn.functional as F

    t, h = x.shape
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k
    counts = torch.zeros(gate_up.shape[0], device=x.device, dtype=torch.int32)
    counts = counts.scatter_add(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    gu = torch._grouped_mm(x[token], gate_up.transpose(1, 2), offs=offs)
    g, u = gu.chunk(2, dim=-1)
    y = torch._grouped_mm((F.silu(g) * u).contiguous(), down.transpose(1, 2), offs=offs)
    y = y.float() * weights.reshape(-1)[order].unsqueeze(1)
    return torch.zeros(t, h, device=x.device, dtype=torch.float32).index_add(0, token, y).to(x.dtype)


def run_tokens(b: Bench, cfg: dict[str, int], tokens: int, dtype: Any, with_cutlass: bool) -> None:
    import torch

    from glmc import kernels as K
    from glmc.kernels import fp8 as F8
    from glmc.kernels.fused_moe import moe_experts_triton, pick_block_m
    from glmc.kernels.moe_align import moe_align_triton
    from glmc.kernels.router import route_triton

    dev = b.device
    h, i, e, k = cfg["hidden"], cfg["inter"], cfg["experts"], cfg["top_k"]
    g = torch.Generator(device=dev).manual_seed(tokens)
    x = torch.randn(tokens, h, device=dev, generator=g).to(dtype)
    router_w = (torch.randn(e, h, device=dev, generator=g) / h**0.5).to(dtype)
    bias = torch.randn(e, device=dev, generator=g) * 0.01
    gate_up = (torch.randn(e, 2 * i, h, device=dev, generator=g) / h**0.5).to(dtype)
    down = (torch.randn(e, h, i, device=dev, generator=g) / i**0.5).to(dtype)
    kw: dict[str, Any] = {
        "top_k": k,
        "n_group": cfg["n_group"],
        "topk_group": cfg["topk_group"],
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    }

    # Router.
    ids, w = route_triton(x, router_w, bias, **kw)
    ids_ref, w_ref = K.route_ref(x, router_w, bias, **kw)
    same = (ids.sort(-1).values == ids_ref.sort(-1).values).all(-1)
    agree = float(same.float().mean()) if tokens else 1.0
    werr = float((w.sort(-1).values - w_ref.sort(-1).values)[same].abs().max()) if bool(same.any()) else 0.0
    b.add(
        Row(
            "router (fused)",
            tokens,
            b.time(lambda: route_triton(x, router_w, bias, **kw)),
            2.0 * tokens * h * e,
            "route_ref",
            b.time(lambda: K.route_ref(x, router_w, bias, **kw)),
            b.check(
                "router", agree >= 0.999 and werr < 1e-5, f"same experts {agree:.2%}, max |dw| {werr:.1e}"
            ),
        )
    )

    # Align.
    bm = pick_block_m(ids.numel(), e)
    got, want = moe_align_triton(ids, e, bm), K.moe_align_ref(ids, e, bm)
    exact = all(torch.equal(a_, b_) for a_, b_ in zip(got, want, strict=True))
    b.add(
        Row(
            f"moe_align (block {bm})",
            tokens,
            b.time(lambda: moe_align_triton(ids, e, bm)),
            0.0,
            "argsort ref",
            b.time(lambda: K.moe_align_ref(ids, e, bm)),
            b.check("moe_align", exact, "bit-exact" if exact else "differs from reference"),
        )
    )

    # Fused MoE forward.
    moe_flops = 6.0 * tokens * k * h * i
    with torch.no_grad():
        out = moe_experts_triton(x, gate_up, down, ids, w)
        ref = K.moe_experts_ref(x, gate_up, down, ids, w)
        peer = baseline_moe(x, gate_up, down, ids, w)
        err, perr = rel_err(out, ref), rel_err(peer, ref)
        tol = 2e-2 if dtype != torch.float32 else 1e-5
        b.add(
            Row(
                "fused MoE fwd",
                tokens,
                b.time(lambda: moe_experts_triton(x, gate_up, down, ids, w)),
                moe_flops,
                "_grouped_mm+permute",
                b.time(lambda: baseline_moe(x, gate_up, down, ids, w)),
                b.check("fused MoE fwd", err < tol, f"rel err {err:.1e} (peer {perr:.1e})"),
            )
        )

    # Fused MoE forward + backward.
    leaves = [t.detach().requires_grad_() for t in (x, gate_up, down, w)]
    dy = torch.randn(tokens, h, device=dev, generator=g).to(dtype)

    def train_step(fn: Callable[..., Any]) -> list[Any]:
        o = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
        return list(torch.autograd.grad(o, leaves, dy))

    grads, peer_grads = train_step(moe_experts_triton), train_step(baseline_moe)
    gerr = max(rel_err(a_, b_) for a_, b_ in zip(grads, peer_grads, strict=True)) if tokens else 0.0
    b.add(
        Row(
            "fused MoE fwd+bwd",
            tokens,
            b.time(lambda: train_step(moe_experts_triton)),
            3 * moe_flops,
            "_grouped_mm+permute",
            b.time(lambda: train_step(baseline_moe)),
            b.check(
                "fused MoE fwd+bwd",
                gerr < 3e-2 if dtype != torch.float32 else gerr < 1e-4,
                f"grad rel diff {gerr:.1e}",
            ),
        )
    )

    # CUTLASS grouped GEMM (gate/up projection on the 128-row padded layout).
    if with_cutlass:
        from glmc.kernels.cutlass_grouped_gemm import grouped_gemm

        al = moe_align_triton(ids, e, 128)
        rows = al.sorted_ids.long()
        valid = rows < ids.numel()
        xs = torch.where(valid.unsqueeze(1), x[torch.where(valid, rows // k, 0)], 0)
        offs_pad = al.offsets[1:].contiguous()
        c = grouped_gemm(xs, gate_up, al.block_expert)
        c_ref = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs_pad)
        used = int(al.offsets[-1])
        cerr = rel_err(c[:used], c_ref[:used]) if used else 0.0
        b.add(
            Row(
                "CUTLASS grouped GEMM gate_up",
                tokens,
                b.time(lambda: grouped_gemm(xs, gate_up, al.block_expert)),
                2.0 * tokens * k * h * 2 * i,
                "_grouped_mm (same rows)",
                b.time(lambda: torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs_pad)),
                b.check("cutlass grouped gemm", cerr < 1e-2, f"rel err {cerr:.1e}"),
            )
        )

    # FP8: quantise, dense GEMM (x @ gate_up[0].T, N = 2I) and grouped GEMM over the routed rows.
    if tokens:
        a_q, a_s = F8.quantize_act_fused(x)
        a_q_ref, a_s_ref = F8.quantize_act_ref(x)
        bit_exact = torch.equal(a_q.view(torch.uint8), a_q_ref.view(torch.uint8)) and torch.equal(
            a_s, a_s_ref
        )
        b.add(
            Row(
                "fp8 quantize act 1x128",
                tokens,
                b.time(lambda: F8.quantize_act_fused(x)),
                0.0,
                "torch ref",
                b.time(lambda: F8.quantize_act_ref(x)),
                b.check("fp8 quantize", bit_exact, "bit-exact" if bit_exact else "differs from reference"),
            )
        )
        w0 = gate_up[0]
        w_q, w_s = F8.quantize_weight_fused(w0)
        y = F8.fp8_gemm_fused(a_q, a_s, w_q, w_s, dtype)
        y_ref = F8.fp8_gemm_ref(a_q, a_s, w_q, w_s, torch.float32)
        ferr = rel_err(y, y_ref)
        b.add(
            Row(
                "fp8 GEMM (block scales)",
                tokens,
                b.time(lambda: F8.fp8_gemm_fused(a_q, a_s, w_q, w_s, dtype)),
                2.0 * tokens * h * 2 * i,
                "bf16 torch.mm",
                b.time(lambda: torch.mm(x, w0.t())),
                b.check("fp8 gemm", ferr < 1e-2, f"rel err vs dequant ref {ferr:.1e}"),
            )
        )
        al1 = K.moe_align_torch(ids, e, 1)
        rows1 = al1.sorted_ids.long()
        xs1 = x[rows1 // k]
        offs1 = al1.offsets[1:].contiguous()
        q1, s1 = F8.quantize_act_fused(xs1)
        per_expert = [F8.quantize_weight_fused(gate_up[j]) for j in range(e)]
        wq = torch.stack([q for q, _ in per_expert])
        ws = torch.stack([s for _, s in per_expert])
        gy = F8.fp8_grouped_gemm_fused(q1, s1, wq, ws, offs1, dtype)
        gy_ref = F8.fp8_grouped_gemm_torch(q1, s1, wq, ws, offs1, torch.float32)
        gerr8 = rel_err(gy, gy_ref)
        if dtype == torch.bfloat16 and dev.type == "cuda":
            peer_name = "bf16 _grouped_mm"
            peer_ms = b.time(lambda: torch._grouped_mm(xs1, gate_up.transpose(1, 2), offs=offs1))
        else:
            peer_name, peer_ms = (
                "glmc.grouped_mm",
                b.time(lambda: K.grouped_mm(xs1, gate_up.transpose(1, 2), offs1)),
            )
        b.add(
            Row(
                "fp8 grouped GEMM gate_up",
                tokens,
                b.time(lambda: F8.fp8_grouped_gemm_fused(q1, s1, wq, ws, offs1, dtype)),
                2.0 * tokens * k * h * 2 * i,
                peer_name,
                peer_ms,
                b.check("fp8 grouped gemm", gerr8 < 1e-2, f"rel err vs dequant ref {gerr8:.1e}"),
            )
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts (default: 1 64 4096 16384)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    p.add_argument("--no-cutlass", action="store_true", help="skip the CUTLASS grouped GEMM")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        # Must be set before glmc's Triton kernel modules are imported.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "bench/kernels.py needs CUDA: no GPU is visible (torch.cuda.is_available() is False). "
            "Run it on a GPU machine (Hopper for the CUTLASS path), or use --cpu-smoke to run the "
            "checks at tiny shapes on CPU under the Triton interpreter.",
            file=sys.stderr,
        )
        return 2

    try:
        import glmc  # noqa: F401
    except ImportError:  # a bare checkout: the repository root holds the glmc package
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from glmc.kernels import use_kernels

    if args.cpu_smoke:
        device, dtype, cfg = torch.device("cpu"), torch.float32, SMOKE
        tokens = tuple(args.tokens or SMOKE_TOKENS)
        bench = Bench(device, iters=args.iters or 1, warmup=0)
        bench.measure_peak(256)
        with_cutlass = False
        print("CPU smoke run: Triton interpreter, tiny shapes; timings say nothing about GPU speed.")
    else:
        device, dtype, cfg = torch.device("cuda"), torch.bfloat16, GLM45
        tokens = tuple(args.tokens or GLM45_TOKENS)
        bench = Bench(device, iters=args.iters or 20, warmup=3)
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
        bench.measure_peak(8192)
        import importlib.util

        with_cutlass = (
            not args.no_cutlass
            and torch.cuda.get_device_capability()[0] == 9
            and importlib.util.find_spec("cutlass") is not None
        )
    print(f"shapes: {cfg}, dtype {dtype}")
    with use_kernels("triton"):
        for t in tokens:
            run_tokens(bench, cfg, t, dtype, with_cutlass)
    if bench.failures:
        print("\nFAILED checks:\n  " + "\n  ".join(bench.failures))
        return 1
    print(f"\nall {len(bench.rows)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
