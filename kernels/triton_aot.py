"""Compile every Triton kernel for a CUDA target on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks the numerics on CPU, but it skips the compiler: it
accepts code the real compiler rejects (non-constexpr globals, for one) and never lowers to PTX.
This runs each launcher on small CPU tensors with the kernels swapped for recorders that compile
the launch ahead of time (`triton.compile` on an `ASTSource`, ptxas ships with triton) instead of
running it, so the exact launch signatures and GPU tile configs of production are compiled.

    python -m glmc.kernels.triton_aot            # sm_90 (Hopper); prints one line per kernel

Run it without TRITON_INTERPRET; kernel outputs are left unwritten (nothing runs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from ._common import interpreting

_PTR = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.float8_e4m3fn: "fp8e4nv",
}


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](...)` compiles instead of launching."""

    def __init__(self, fn: Any, target: Any, log: list[tuple[str, dict[str, Any], Any]]) -> None:
        self.fn = fn
        self.target = target
        self.log = log

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return self._compile

    def _compile(self, *args: Any, num_warps: int = 4, num_stages: int = 3, **kwargs: Any) -> None:
        import triton
        from triton.compiler import ASTSource

        names = self.fn.arg_names
        values = dict(zip(names, args, strict=False)) | kwargs
        signature: dict[str, str] = {}
        constexprs: dict[str, Any] = {}
        for name, param in zip(names, self.fn.params, strict=True):
            if param.is_constexpr:
                signature[name] = "constexpr"
                constexprs[name] = values[name]
            else:
                signature[name] = _arg_type(values[name])
        src = ASTSource(self.fn, signature, constexprs=constexprs)
        compiled = triton.compile(
            src, target=self.target, options={"num_warps": num_warps, "num_stages": num_stages}
        )
        self.log.append((self.fn.__name__, constexprs, compiled))


def _launch_everything(dtype: torch.dtype) -> None:
    from . import fp8_triton, fused_moe_triton, moe_align_triton, router_triton

    t, h, i, e, k = 40, 256, 128, 16, 4
    x = torch.randn(t, h, dtype=dtype)
    router_triton.launch_route(x, torch.randn(e, h, dtype=dtype), torch.zeros(e), k, 1, 1, True, 2.5)
    router_triton.launch_route(x, torch.randn(e, h, dtype=dtype), None, k, 4, 2, False, 1.0)
    # GLM-4.5's router and align: 160 experts, top-8.
    router_triton.launch_route(x, torch.randn(160, h, dtype=dtype), torch.zeros(160), 8, 1, 1, True, 2.5)
    moe_align_triton.launch_moe_align(torch.randint(0, 160, (t, 8)), 160, 64)
    ids = torch.randint(0, e, (t, k))
    block_m = 16
    sorted_ids, block_expert, offsets, _ = moe_align_triton.launch_moe_align(ids, e, block_m)
    gate_up, down = torch.randn(e, 2 * i, h, dtype=dtype), torch.randn(e, h, i, dtype=dtype)
    weights = torch.rand(t, k)
    fused_moe_triton.moe_forward(x, gate_up, down, weights, sorted_ids, block_expert, k, block_m, True)
    preact = torch.zeros(sorted_ids.shape[0], 2 * i, dtype=dtype)
    fused_moe_triton.moe_backward(
        x, x, gate_up, down, weights, sorted_ids, block_expert, offsets, preact, k, block_m
    )
    a, a_s = fp8_triton.launch_quantize_act(x)
    w, w_s = fp8_triton.launch_quantize_weight(gate_up[0])
    fp8_triton.launch_fp8_gemm(a, a_s, w, w_s, dtype)
    ws = torch.stack([w] * e)
    w_ss = torch.stack([w_s] * e)
    offs = torch.linspace(0, t, e).round().to(torch.int32)
    fp8_triton.launch_fp8_grouped_gemm(a, a_s, ws, w_ss, offs, dtype)


def compile_all(
    capability: int = 90, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)
) -> list[tuple[str, dict[str, Any], Any]]:
    """Compile every kernel launch for `capability` (90: sm_90) and each activation dtype.
    Returns (kernel name, constexprs, compiled kernel with .asm["ptx"] / ["cubin"]) per launch."""
    if interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
    from triton.backends.compiler import GPUTarget

    from . import _triton_helpers, fp8_triton, fused_moe_triton, moe_align_triton, router_triton

    del _triton_helpers
    target = GPUTarget("cuda", capability, 32)
    log: list[tuple[str, dict[str, Any], Any]] = []
    modules = (router_triton, moe_align_triton, fused_moe_triton, fp8_triton)
    saved: list[tuple[Any, str, Any]] = []
    for module in modules:
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(obj, "arg_names"):
                saved.append((module, name, obj))
                setattr(module, name, _Recorder(obj, target, log))
    try:
        for dtype in dtypes:
            _launch_everything(dtype)
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)
    return log


def main() -> int:
    capability = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    for name, constexprs, compiled in compile_all(capability):
        shown = {key: val for key, val in constexprs.items() if not key.startswith("stride")}
        print(f"{name:<24} cubin {len(compiled.asm['cubin']):>7} B  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
