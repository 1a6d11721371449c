# mypy: disable-error-code="no-untyped-def"
"""Device helpers shared by the Triton kernels, with the interpreter workarounds in one place.

Under TRITON_INTERPRET=1 (CPU tests) two conversions are wrong in Triton 3.7: `tl.dot` on bf16
multiplies raw bit patterns (triton#11584), and fp32 -> bf16 casts truncate instead of rounding
to nearest even (`fp_downcast_rounding="rtne"` is ignored too). Kernels take an `INTERP`
constexpr: with it, dots run on fp32 copies (exact for bf16/fp16/fp8 inputs) and bf16 casts
round explicitly. On GPU both flags are off and the native instructions are used.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, INTERP: tl.constexpr, PREC: tl.constexpr):
    if INTERP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _bf16_rne(x):
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def cast(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """x.to(dtype), rounding to nearest even also in the interpreter."""
    if INTERP and dtype == tl.bfloat16:
        return _bf16_rne(x)
    return x.to(dtype)
