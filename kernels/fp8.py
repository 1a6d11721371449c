"""Block-scaled FP8 (DeepSeek-V3 format): E4M3 values with fp32 `scale_inv`, x ~ x_fp8 * scale_inv
per block. Activations use 1 x 128 blocks (scale [M, ceil(K/128)]), weights 128 x 128 blocks
(weight [N, K], scale [ceil(N/128), ceil(K/128)]; grouped weights add a leading expert dim).

scale_inv = max(amax, 1e-12) / 448: an all-zero block gets a tiny finite scale (values stay 0),
huge values stay finite (fp32 amax / 448), and x / scale_inv is clamped to +-448 before the
round-to-nearest-even cast, so nothing saturates to NaN. Shapes need not divide by 128: partial
blocks take the amax of the elements that exist.

`*_ref` are plain torch; `glmc::fp8_*` are the Triton kernels as custom ops. The quantisers
match their references bit for bit (also under the interpreter, see fp8_triton.py); the GEMMs
accumulate per 128-wide K block in fp32 and apply both scales per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import AMAX_EPS, BLOCK, FP8, FP8_MAX, cdiv


def _pad_to(x: Tensor, rows: int, cols: int) -> Tensor:
    return F.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def _quantize(x: Tensor, scale_inv_full: Tensor) -> Tensor:
    return (x / scale_inv_full).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _scale_from_amax(amax: Tensor) -> Tensor:
    return amax.clamp(min=AMAX_EPS, max=torch.finfo(torch.float32).max) / FP8_MAX


def quantize_act_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """[M, K] -> (fp8 [M, K], scale_inv fp32 [M, ceil(K/128)])."""
    m, k = x.shape
    kb = cdiv(k, BLOCK)
    xf = x.float()
    amax = _pad_to(xf.abs(), m, kb * BLOCK).view(m, kb, BLOCK).amax(-1)
    s = _scale_from_amax(amax)
    return _quantize(xf, s.repeat_interleave(BLOCK, 1)[:, :k]), s


def quantize_weight_ref(w: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] -> (fp8 [N, K], scale_inv fp32 [ceil(N/128), ceil(K/128)])."""
    n, k = w.shape
    nb, kb = cdiv(n, BLOCK), cdiv(k, BLOCK)
    wf = w.float()
    amax = _pad_to(wf.abs(), nb * BLOCK, kb * BLOCK).view(nb, BLOCK, kb, BLOCK).amax((1, 3))
    s = _scale_from_amax(amax)
    return _quantize(wf, expand_weight_scale(s, n, k)), s


def expand_weight_scale(s: Tensor, n: int, k: int) -> Tensor:
    return s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]


def dequantize_act_ref(q: Tensor, s: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * s.repeat_interleave(BLOCK, 1)[:, : q.shape[1]]).to(dtype)


def dequantize_weight_ref(q: Tensor, s: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * expand_weight_scale(s, *q.shape)).to(dtype)


def fp8_gemm_ref(
    a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """a [M, K] fp8 with 1x128 scales, w [N, K] fp8 with 128x128 scales -> a @ w.T [M, N]."""
    return (dequantize_act_ref(a, a_s) @ dequantize_weight_ref(w, w_s).t()).to(out_dtype)


def fp8_grouped_gemm_ref(
    a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, offs: Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Rows of `a` sorted by group, offs [G] int32 cumulative ends, w [G, N, K]; rows past offs[-1]
    come out zero (the `glmc::grouped_mm` contract)."""
    out = torch.zeros(a.shape[0], w.shape[1], device=a.device, dtype=out_dtype)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = fp8_gemm_ref(a[start:end], a_s[start:end], w[g], w_s[g], out_dtype)
        start = end
    return out


def fp8_grouped_gemm_torch(
    a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, offs: Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Dequantise, then `glmc::grouped_mm` in fp32: no host sync, compiles fullgraph (CPU path)."""
    from .grouped_mm import grouped_mm

    _, n, k = w.shape
    w32 = (w.float() * w_s.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)[:, :n, :k]).transpose(1, 2)
    return grouped_mm(dequantize_act_ref(a, a_s), w32, offs).to(out_dtype)


# --- Triton kernels as custom ops ------------------------------------------------------------


@torch.library.custom_op("glmc::fp8_quantize_act", mutates_args=())
def quantize_act_fused(x: Tensor) -> tuple[Tensor, Tensor]:
    from .fp8_triton import launch_quantize_act

    return launch_quantize_act(x)


@quantize_act_fused.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(
        x.shape[0], cdiv(x.shape[1], BLOCK), dtype=torch.float32
    )


@torch.library.custom_op("glmc::fp8_quantize_weight", mutates_args=())
def quantize_weight_fused(w: Tensor) -> tuple[Tensor, Tensor]:
    from .fp8_triton import launch_quantize_weight

    return launch_quantize_weight(w)


@quantize_weight_fused.register_fake
def _(w: Tensor) -> tuple[Tensor, Tensor]:
    n, k = w.shape
    return w.new_empty(w.shape, dtype=FP8), w.new_empty(cdiv(n, BLOCK), cdiv(k, BLOCK), dtype=torch.float32)


@torch.library.custom_op("glmc::fp8_gemm", mutates_args=())
def fp8_gemm_fused(a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, out_dtype: torch.dtype) -> Tensor:
    from .fp8_triton import launch_fp8_gemm

    return launch_fp8_gemm(a, a_s, w, w_s, out_dtype)


@fp8_gemm_fused.register_fake
def _(a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, out_dtype: torch.dtype) -> Tensor:
    return a.new_empty(a.shape[0], w.shape[0], dtype=out_dtype)


@torch.library.custom_op("glmc::fp8_grouped_gemm", mutates_args=())
def fp8_grouped_gemm_fused(
    a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, offs: Tensor, out_dtype: torch.dtype
) -> Tensor:
    from .fp8_triton import launch_fp8_grouped_gemm

    return launch_fp8_grouped_gemm(a, a_s, w, w_s, offs, out_dtype)


@fp8_grouped_gemm_fused.register_fake
def _(a: Tensor, a_s: Tensor, w: Tensor, w_s: Tensor, offs: Tensor, out_dtype: torch.dtype) -> Tensor:
    return a.new_empty(a.shape[0], w.shape[1], dtype=out_dtype)


# --- Weight-only dequantisation (the CPU FP8 path, and what graph exporters lower) ----------


def expand_scale_rows(s: Tensor, segments: tuple[int, ...], block_rows: int) -> Tensor:
    """Scales whose rows are the concatenation of each row segment's own scale rows
    ([..., sum(ceil(seg / block_rows)), kb]) -> one scale row per weight row ([..., R, kb]).
    A fused weight (q/k/v, gate/up, each expert's halves) is quantised segment by segment, so a
    block never straddles two segments even where a segment is not 128-aligned."""
    if block_rows == 1:
        return s
    parts, off = [], 0
    for seg in segments:
        nb = cdiv(seg, block_rows)
        parts.append(s[..., off : off + nb, :].repeat_interleave(block_rows, dim=-2)[..., :seg, :])
        off += nb
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def _dequantize_rows(q: Tensor, s_rows: Tensor, block: int) -> Tensor:
    c = q.shape[-1]
    if c % block == 0:  # a broadcast multiply, no expanded scale tensor
        return (q.float().unflatten(-1, (c // block, block)) * s_rows.float().unsqueeze(-1)).flatten(-2)
    return q.float() * s_rows.float().repeat_interleave(block, dim=-1)[..., :c]


@torch.library.custom_op("glmc::fp8_dequantize", mutates_args=())
def dequantize_rows(q: Tensor, s_rows: Tensor, block: int) -> Tensor:
    """fp8 q [..., R, C] x per-row block scales s_rows [..., R, ceil(C / block)] -> fp32.
    One custom op (ONNX's blocked `DequantizeLinear` along the last axis, the form
    export/onnx lowers it to); `block` = C gives one scale per row (the channel recipe)."""
    return _dequantize_rows(q, s_rows, block)


@dequantize_rows.register_fake
def _(q: Tensor, s_rows: Tensor, block: int) -> Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)
