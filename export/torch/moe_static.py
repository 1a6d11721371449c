"""Static-shape routed-expert compute for the graph exporters (ONNX, AOTInductor, Torch-TensorRT).

The training path (`moe.moe_experts`) sorts tokens by expert and runs a grouped GEMM: its
group sizes depend on the data, which ONNX cannot express (no grouped-matmul op) and
Torch-TensorRT cannot compile. Here every token gathers its own k experts' weights, so every
shape follows from T and k alone. Same math, same dtypes; the cost is T*k weight copies, cheap
for decode (T = 1..K+1) and for small models, heavy for long prefills of big ones.

Selected per model with `static_moe(model)` at export time; the default path is untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

from glmc.kernels import use_kernels


def moe_experts_static(x: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for x [T, H], ids/weights [T, k];
    gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""
    xs = x[:, None, None, :]  # [T, 1, 1, H]: broadcast over the k slots
    gu = (xs @ gate_up[ids].transpose(-1, -2)).squeeze(-2)  # [T, k, 2I]
    gate, up = gu.chunk(2, dim=-1)
    act = (F.silu(gate) * up)[..., None, :]  # [T, k, 1, I]
    ys = (act @ down[ids].transpose(-1, -2)).squeeze(-2)  # [T, k, H]
    # Weights are fp32 (router precision): mix in fp32 like the default path, then cast back.
    return (ys * weights[..., None]).sum(1).to(x.dtype)


def set_static_moe(model: nn.Module, on: bool = True) -> None:
    """Switch every routed-expert module of `model` to (or back from) the static-shape path."""
    for m in model.modules():
        if hasattr(m, "static_shapes"):
            m.static_shapes = on  # type: ignore[assignment]


@contextmanager
def static_moe(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model`'s MoE layers use `moe_experts_static` and the router runs in
    plain torch (a Triton router is an opaque custom op no exporter can lower)."""
    set_static_moe(model, True)
    try:
        with use_kernels("torch"):
            yield model
    finally:
        set_static_moe(model, False)
