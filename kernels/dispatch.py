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


def fp8_linear(x: Tensor, weight: Tensor, weight_scale_inv: Tensor) -> Tensor:
    """y = x @ dequant(weight).T with x quantised per 1 x 128 block on the fly; y in x's dtype."""
    lead = x.shape[:-1]
    a, a_s = quantize_act(x.reshape(-1, x.shape[-1]))
    return fp8_gemm(a, a_s, weight, weight_scale_inv, x.dtype).reshape(*lead, weight.shape[0])


__all__ = [
    "BACKENDS",
    "backend_for",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "fp8_linear",
    "moe_experts",
    "quantize_act",
    "quantize_weight",
    "requested_kernels",
    "route",
    "set_kernels",
    "use_kernels",
]
