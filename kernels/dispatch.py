"""The kernel seam: the torch target calls these and never picks kernels itself.

Backends:
- "ref":     the plain-torch references (a Python loop over experts; for tests);
- "torch":   compiled-torch paths: counting-sort align + `glmc::grouped_mm`; the default on CPU;
- "triton":  fused Triton kernels; the default on CUDA, and on CPU under TRITON_INTERPRET=1;
- "cutlass": the CUTLASS (CuTe DSL) Hopper grouped GEMM for the expert GEMMs (CUDA, bf16/fp16),
             Triton for the router;
- "auto":    "triton" on CUDA when triton is installed, "torch" otherwise.

The choice comes from `use_kernels(...)` / `set_kernels(...)` if set, else the GLMC_KERNELS
environment variable (read at each call), else "auto". Under torch.compile the choice is made
while tracing, so set it before compiling.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from . import fp8 as _fp8
from ._common import cutlass_available, triton_available, triton_runs_on
from .fused_moe import moe_experts_ref, moe_experts_torch, moe_experts_triton
from .router import route_ref, route_triton

BACKENDS = ("auto", "ref", "torch", "triton", "cutlass")
BLOCK = _fp8.BLOCK
_override: str | None = None


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")
    return name


def set_kernels(name: str | None) -> None:
    """Force a backend for every later call (None: back to GLMC_KERNELS / auto)."""
    global _override
    _override = None if name is None else _validate(name, "set_kernels")


@contextmanager
def use_kernels(name: str) -> Iterator[None]:
    """Force a backend inside a `with` block (tests, benchmarks)."""
    global _override
    previous = _override
    _override = _validate(name, "use_kernels")
    try:
        yield
    finally:
        _override = previous


def requested_kernels() -> str:
    if _override is not None:
        return _override
    return _validate(os.environ.get("GLMC_KERNELS", "auto") or "auto", "GLMC_KERNELS")


def backend_for(device: torch.device, op: str = "moe") -> str:
    """Resolve the requested backend for tensors on `device` ("ref", "torch", "triton", "cutlass")."""
    name = requested_kernels()
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name in ("triton", "cutlass") and not triton_runs_on(device):
        where = "set TRITON_INTERPRET=1 to run it on CPU" if device.type == "cpu" else "it needs CUDA"
        if not triton_available():
            where = "triton is not installed"
        raise RuntimeError(f"kernel backend {name!r} cannot run on {device.type} tensors: {where}")
    if name == "cutlass":
        if op != "moe":
            return "triton"
        if device.type != "cuda" or not cutlass_available():
            raise RuntimeError("kernel backend 'cutlass' needs CUDA and nvidia-cutlass-dsl")
    return name


def route(
    logits_input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[Tensor, Tensor]:
    """GLM-4.5 router. logits_input [T, H], weight [E, H], bias [E] fp32 or None ->
    (ids [T, top_k] int64, weights [T, top_k] fp32); weights are differentiable w.r.t. the input
    and the router weight, the bias only steers selection."""
    kwargs = {
        "top_k": top_k,
        "n_group": n_group,
        "topk_group": topk_group,
        "norm_topk_prob": norm_topk_prob,
        "routed_scaling_factor": routed_scaling_factor,
    }
    if backend_for(logits_input.device, "route") == "triton":
        return route_triton(logits_input, weight, bias, **kwargs)  # type: ignore[arg-type]
    return route_ref(logits_input, weight, bias, **kwargs)  # type: ignore[arg-type]


def moe_experts(x: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    """Routed experts. x [T, H], gate_up [E, 2I, H] (gate rows first), down [E, H, I],
    ids [T, k], weights [T, k] fp32 -> [T, H] in x's dtype: sum_j weights[t, j] *
    down[ids[t, j]] @ (silu(gate) * up). Differentiable w.r.t. x, gate_up, down and weights."""
    _check_moe(x, gate_up, down, ids, weights)
    backend = backend_for(x.device, "moe")
    if backend == "triton":
        return moe_experts_triton(x, gate_up, down, ids, weights)
    if backend == "cutlass":
        from .cutlass_moe import moe_experts_cutlass

        return moe_experts_cutlass(x, gate_up, down, ids, weights)
    if backend == "ref":
        return moe_experts_ref(x, gate_up, down, ids, weights)
    return moe_experts_torch(x, gate_up, down, ids, weights)


def _check_moe(x: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, weights: Tensor) -> None:
    t, h = x.shape
    e, two_i, h2 = gate_up.shape
    if h2 != h or two_i % 2 or down.shape != (e, h, two_i // 2):
        raise ValueError(
            f"expert weights do not fit x [T={t}, H={h}]: gate_up {tuple(gate_up.shape)} must be "
            f"[E, 2I, H] and down {tuple(down.shape)} [E, H, I]"
        )
    if ids.shape != weights.shape or ids.shape[0] != t:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be [T={t}, k]")
    if not (x.dtype == gate_up.dtype == down.dtype):
        raise TypeError(
            f"x, gate_up and down must share a dtype, got {x.dtype}, {gate_up.dtype}, {down.dtype}"
        )


# --- FP8 (block-scaled, DeepSeek-V3 format) ----------------------------------------------------


def _fp8_fused(device: torch.device) -> bool:
    return backend_for(device, "fp8") in ("triton", "cutlass")


def quantize_act(x: Tensor) -> tuple[Tensor, Tensor]:
    """[M, K] -> (E4M3 [M, K], scale_inv fp32 [M, ceil(K/128)]), 1 x 128 blocks."""
    return _fp8.quantize_act_fused(x) if _fp8_fused(x.device) else _fp8.quantize_act_ref(x)


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] -> (E4M3 [N, K], scale_inv fp32 [ceil(N/128), ceil(K/128)]), 128 x 128 blocks."""
    return _fp8.quantize_weight_fused(w) if _fp8_fused(w.device) else _fp8.quantize_weight_ref(w)


def fp8_gemm(
    a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Block-scaled a [M, K] @ w [N, K].T -> [M, N] in out_dtype."""
    if _fp8_fused(a.device):
        return _fp8.fp8_gemm_fused(a, a_s, w, w_s, out_dtype)
    return _fp8.fp8_gemm_ref(a, a_s, w, w_s, out_dtype)


def fp8_grouped_gemm(
    a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, offs: Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Rows of a sorted by group (offs [G] int32 cumulative ends) times w [G, N, K].T per group."""
    backend = backend_for(a.device, "fp8")
    if backend in ("triton", "cutlass"):
        return _fp8.fp8_grouped_gemm_fused(a, a_s, w, w_s, offs, out_dtype)
    if backend == "ref":
        return _fp8.fp8_grouped_gemm_ref(a, a_s, w, w_s, offs, out_dtype)
    return _fp8.fp8_grouped_gemm_torch(a, a_s, w, w_s, offs, out_dtype)


def dequantize_fp8(
    q: Tensor, scale: Tensor, *, recipe: str, segments: tuple[int, ...] | None = None, dtype: torch.dtype
) -> Tensor:
    """An FP8 weight q [..., R, C] with its scales (glmc.ir.quant's layout: `block128` scale
    rows per 128-row block of each row segment, `channel` one per row) -> `dtype`."""
    rows, cols = q.shape[-2], q.shape[-1]
    segs = segments if segments is not None else (rows,)
    if recipe == "block128":
        s_rows, block = _fp8.expand_scale_rows(scale, segs, BLOCK), BLOCK
    elif recipe == "channel":
        s_rows, block = scale, cols
    else:
        raise ValueError(f"unknown FP8 recipe {recipe!r}")
    return _fp8.dequantize_rows(q, s_rows, block).to(dtype)


def _plain_blocks(segments: tuple[int, ...]) -> bool:
    """Segment-wise block scales equal the plain 128 x 128 layout the Triton kernels read."""
    return all(s % BLOCK == 0 for s in segments[:-1])


def fp8_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale_inv: Tensor,
    *,
    recipe: str = "block128",
    segments: tuple[int, ...] | None = None,
) -> Tensor:
    """y = x @ dequant(weight).T in x's dtype, weight [N, K] FP8 with its scales.

    Triton backend (CUDA, or forced): x is quantised per 1 x 128 block on the fly and the GEMM
    runs on FP8 operands, as the serving stacks do (block128 in the plain block layout).
    Otherwise the weight is dequantised and x stays in its dtype (weight-only FP8), so the
    result equals the model with dequant(quant(w)) weights. On CPU that is also the faster
    choice: `torch._scaled_mm` there takes only tensor- or row-wise scales (block128 would need
    one call per 128-wide K block), must quantise x too, and measured no faster than
    dequantise + fp32 GEMM at [16, 1024] x [1024, 1024] (123 ms tensor-wise, 104 ms
    row-wise vs 129 ms, on a loaded 2-core box).
    """
    segs = segments if segments is not None else (weight.shape[0],)
    if recipe == "block128" and _fp8_fused(x.device) and _plain_blocks(segs):
        lead = x.shape[:-1]
        a, a_s = quantize_act(x.reshape(-1, x.shape[-1]))
        return fp8_gemm(a, a_s, weight, weight_scale_inv, x.dtype).reshape(*lead, weight.shape[0])
    w = dequantize_fp8(weight, weight_scale_inv, recipe=recipe, segments=segs, dtype=x.dtype)
    return torch.nn.functional.linear(x, w)


def fp8_moe_experts(
    x: Tensor,
    gate_up: Tensor,
    gate_up_scale: Tensor,
    down: Tensor,
    down_scale: Tensor,
    ids: Tensor,
    weights: Tensor,
    *,
    recipe: str,
) -> Tensor:
    """`moe_experts` on FP8 stacked experts (gate_up [E, 2I, H] quantised per gate/up half of
    each expert, down [E, H, I]) with their scales. Triton backend with 128-aligned halves:
    tokens sorted by expert, activations quantised per 1 x 128 block, `fp8_grouped_gemm` for
    both GEMMs. Otherwise the weights are dequantised to x's dtype and `moe_experts` runs
    (weight-only FP8, as `fp8_linear`)."""
    e, two_i, _ = gate_up.shape
    half = two_i // 2
    if recipe == "block128" and _fp8_fused(x.device) and half % BLOCK == 0:
        from .moe_align import moe_align_torch

        t, hidden = x.shape
        top_k = ids.shape[1]
        align = moe_align_torch(ids, e, block_m=1)
        pair = align.sorted_ids.long()
        token = pair // top_k
        offs = align.offsets[1:].to(torch.int32)
        a, a_s = quantize_act(x.index_select(0, token))
        gu = fp8_grouped_gemm(a, a_s, gate_up, gate_up_scale, offs, x.dtype)
        gate, up = gu.chunk(2, dim=-1)
        h, h_s = quantize_act(torch.nn.functional.silu(gate) * up)
        y = fp8_grouped_gemm(h, h_s, down, down_scale, offs, torch.float32)
        y = y * weights.reshape(-1).index_select(0, pair).unsqueeze(1)
        out = x.new_zeros(t, hidden, dtype=torch.float32)
        return out.scatter_add(0, token.unsqueeze(1).expand(-1, hidden), y).to(x.dtype)
    gu_w = dequantize_fp8(gate_up, gate_up_scale, recipe=recipe, segments=(half, half), dtype=x.dtype)
    down_w = dequantize_fp8(down, down_scale, recipe=recipe, dtype=x.dtype)
    return moe_experts(x, gu_w, down_w, ids, weights)


__all__ = [
    "BACKENDS",
    "backend_for",
    "dequantize_fp8",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "fp8_linear",
    "fp8_moe_experts",
    "moe_experts",
    "quantize_act",
    "quantize_weight",
    "requested_kernels",
    "route",
    "set_kernels",
    "use_kernels",
]
