"""Grouped GEMM over expert-sorted rows, as a `torch.library` custom op with autograd.

Why a custom op: `torch._grouped_mm`'s meta kernel accepts only bf16, so fp32 models fail to
compile or export with it directly; behind a custom op with a fake kernel the compiler treats
it as opaque and fullgraph compile works for every dtype. The eager kernel falls back to a loop
of `mm`s where `_grouped_mm` cannot run (strides not multiples of 16 bytes, unsupported dtype
or device).

Shapes: x [T, K] with rows sorted by group; w [G, K, N]; offs [G] int32, the cumulative row
ends (offs[g-1]..offs[g] belong to group g); out [T, N]. Rows past offs[-1] come out as zero.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _aligned(*ts: Tensor) -> bool:
    for t in ts:
        item = t.element_size()
        if any((s * item) % 16 for s, d in zip(t.stride(), t.shape, strict=True) if s != 1 and d > 1):
            return False
        if t.stride(-1) != 1 and t.stride(-2) != 1:
            return False
    return True


def _native_ok(*ts: Tensor) -> bool:
    t = ts[0]
    if t.device.type == "cpu":
        return t.dtype in (torch.float32, torch.bfloat16, torch.float16) and _aligned(*ts)
    if t.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(t.device)
        return t.dtype == torch.bfloat16 and major >= 9 and _aligned(*ts)
    return False


def grouped_mm_ref(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Plain-torch reference: one mm per group."""
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[g]
        start = end
    return out


def grouped_mm_wgrad_ref(x: Tensor, dy: Tensor, offs: Tensor) -> Tensor:
    """Reference weight gradient: dw[g] = x_g^T dy_g, [G, K, N]."""
    dw = x.new_zeros(offs.shape[0], x.shape[1], dy.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            dw[g] = x[start:end].t() @ dy[start:end]
        start = end
    return dw


@torch.library.custom_op("glmc::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    if _native_ok(x, w):
        out = torch._grouped_mm(x, w, offs=offs)
        # _grouped_mm leaves rows past offs[-1] unwritten; the contract says zero.
        used = int(offs[-1]) if offs.numel() else 0
        if used < x.shape[0]:
            out[used:] = 0
        return out
    return grouped_mm_ref(x, w, offs)


@grouped_mm.register_fake
def _(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("glmc::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(x: Tensor, dy: Tensor, offs: Tensor) -> Tensor:
    xt = x.t()
    if _native_ok(xt, dy):
        dw = torch._grouped_mm(xt, dy, offs=offs)
        # Groups with no rows are left unwritten by some backends.
        counts = torch.diff(offs, prepend=offs.new_zeros(1))
        return dw.masked_fill((counts == 0).view(-1, 1, 1), 0)
    return grouped_mm_wgrad_ref(x, dy, offs)


@grouped_mm_wgrad.register_fake
def _(x: Tensor, dy: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _setup_context(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor, ...], output: Tensor
) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad: Tensor
) -> tuple[Tensor | None, Tensor | None, None]:
    x, w, offs = ctx.saved_tensors  # type: ignore[attr-defined]
    grad = grad.contiguous()  # _grouped_mm rejects stride-0 (expanded) gradients
    dx = grouped_mm(grad, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None  # type: ignore[attr-defined]
    dw = grouped_mm_wgrad(x, grad, offs) if ctx.needs_input_grad[1] else None  # type: ignore[attr-defined]
    return dx, dw, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
