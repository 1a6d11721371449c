"""FP8 weights in the torch target: modules that hold E4M3 weights with their scales, and the
pure weight transform that turns the unpassed model's state into the passed graph's.

The state-dict layout is the IR's: an FP8 weight under its own name (`...qkv_proj.weight`,
`...experts.gate_up_proj`) in `float8_e4m3fn`, its fp32 scales beside it under the IR scale
name (`weight_scale_inv` for block128, `weight_scale` for channel, as in the Hugging Face FP8
layout). A fused weight's scale rows are its segments' own (glmc.ir.quant), so the tensors are
those the fused checkpoint layout (export/hf/layout.py) stores, under glmc's module names.

The GEMMs go through `glmc.kernels.dispatch` (`fp8_linear`, `fp8_moe_experts`): Triton FP8
GEMMs on CUDA, weight-only dequantisation on CPU. FP8 modules are for inference: their weights
are buffers, so optimizers never see them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from glmc.ir import GlmcError, Graph, Param, ParamRole
from glmc.ir.quant import row_segments, scale_param_name, scale_shape
from glmc.kernels import dispatch

from ..hf import fp8 as hf_fp8

FP8 = torch.float8_e4m3fn


class KeepDtypes(nn.Module):
    """`model.to(dtype)` (and `.half()`, `.cuda()`, ...) moves this module's buffers, FP8
    weights and fp32 scales, to the new device but never casts them: a cast would undo the
    quantisation or round the scales (fp32 -> bf16 -> fp32 is not the identity)."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        held = {k: b for k, b in self._buffers.items() if b is not None}
        for k in held:
            self._buffers[k] = None
        try:
            out = super()._apply(fn, recurse)
        finally:
            for k, b in held.items():
                # `fn` on an empty view says where the tensor goes, without converting its values.
                where = fn(b.reshape(-1)[:0]).device
                self._buffers[k] = b.to(device=where)
        return out


class FP8Linear(KeepDtypes):
    """y = x @ dequant(weight).T (+ bias): weight [out, in] E4M3, scales per glmc.ir.quant."""

    def __init__(self, p: Param, bias: bool) -> None:
        super().__init__()
        if p.attrs.quant is None:
            raise GlmcError(f"{p.name}: an FP8 linear needs a weight quantize-fp8 marked (quant=<recipe>)")
        self.recipe: str = p.attrs.quant
        self.segments = row_segments(p)
        self.scale_name = scale_param_name("weight", self.recipe)
        self.weight: Tensor
        out_features, in_features = p.shape
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer(self.scale_name, torch.empty(scale_shape(p, self.recipe), dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @property
    def scale(self) -> Tensor:
        return self._buffers[self.scale_name]  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        y = dispatch.fp8_linear(x, self.weight, self.scale, recipe=self.recipe, segments=self.segments)
        return y if self.bias is None else y + self.bias

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return dispatch.dequantize_fp8(
            self.weight, self.scale, recipe=self.recipe, segments=self.segments, dtype=dtype
        )


def linear(p: Param, bias: bool) -> nn.Module:
    """The module for GEMM weight `p` [out, in]: FP8 if the graph quantised it."""
    if p.attrs.quant is not None:
        return FP8Linear(p, bias)
    out_features, in_features = p.shape
    return nn.Linear(in_features, out_features, bias=bias)


def quantize_param(w: Tensor, recipe: str, segments: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """w [..., R, C] -> (E4M3 [..., R, C], fp32 scales): each leading index (expert) and each
    row segment quantised on its own with export/hf's quantiser, scale rows concatenated."""
    lead = w.shape[:-2]
    flat = w.reshape(-1, *w.shape[-2:])
    qs, ss = [], []
    for m in flat:
        q_parts, s_parts, r0 = [], [], 0
        for seg in segments:
            q, s = hf_fp8.quantize(m[r0 : r0 + seg], recipe)
            q_parts.append(q)
            s_parts.append(s)
            r0 += seg
        qs.append(torch.cat(q_parts))
        ss.append(torch.cat(s_parts))
    q_all = torch.stack(qs).reshape(w.shape)
    s_all = torch.stack(ss)
    return q_all, s_all.reshape(*lead, *s_all.shape[-2:])


def passed_state(graph: Graph, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The unpassed model's state (plain lowering: separate q/k/v and gate/up, stacked experts,
    high precision) -> the state of `build_model(graph)`: fused parameters concatenated from
    their components, FP8 weights quantised with their scales. Pure; tensors of parameters the
    passes left alone are passed through (not copied). Raises GlmcError naming a missing
    tensor or a weight that cannot be quantised."""
    out: dict[str, Tensor] = {}
    for fqn, node, p in graph.params():
        if p.role is ParamRole.SCALE:
            continue  # produced with its weight
        if p.attrs.fused:
            parts = [f"{node.name}.{c}" for c in p.attrs.fused]
            missing = [k for k in parts if k not in state]
            if missing:
                raise GlmcError(f"{missing[0]}: not in the weights (needed for {fqn})")
            w = torch.cat([state[k] for k in parts])
        elif fqn in state:
            w = state[fqn]
        else:
            if not p.attrs.checkpoint or p.tied_to is not None:
                continue
            raise GlmcError(f"{fqn}: not in the weights")
        recipe = p.attrs.quant
        if recipe is None:
            out[fqn] = w
            continue
        try:
            q, s = quantize_param(w, recipe, row_segments(p))
        except ValueError as e:
            raise GlmcError(f"{fqn}: cannot quantise to FP8: it {e}") from None
        out[fqn] = q
        out[f"{node.name}.{scale_param_name(p.name, recipe)}"] = s
    # Plain-state entries the graph does not list as parameters (buffers) pass through.
    known = set(out)
    for fqn, node, p in graph.params():
        known.add(fqn)
        known.update(f"{node.name}.{c}" for c in p.attrs.fused)
    out.update({k: v for k, v in state.items() if k not in known})
    return out


def checkpoint_state(graph: Graph, read: Callable[[str], Tensor]) -> dict[str, Tensor]:
    """The state of `build_model(graph)` from a checkpoint glmc wrote for `graph` (export/hf's
    layout: fused or Hugging Face names, FP8 with scales), without dequantising: `read(name)`
    returns a stored tensor. Per-expert tensors are stacked and fused components concatenated,
    scales alongside; the checkpoint-only MTP copies are not read. Raises GlmcError naming a
    tensor `read` lacks (KeyError from `read`)."""
    from ..hf import plan_checkpoint

    layout = iter(plan_checkpoint(graph))
    out: dict[str, Tensor] = {}

    def get(name: str) -> Tensor:
        try:
            return read(name)
        except KeyError:
            raise GlmcError(f"{name}: not in the checkpoint") from None

    for fqn, node, p in graph.params():
        if p.role is ParamRole.SCALE or not p.attrs.checkpoint:
            continue
        # plan_checkpoint lists, in graph order, one stored tensor per parameter (fused layout)
        # or one per Hugging Face tensor: per expert and gate/up half, per q/k/v component.
        if graph.attrs.weight_layout == "fused":
            count = 1
        elif p.role is ParamRole.EXPERT:
            count = p.shape[0] * len(row_segments(p))
        else:
            count = len(p.attrs.fused or (None,))
        stored = [next(layout) for _ in range(count)]
        if p.tied_to is not None:
            continue  # a checkpoint-only copy: the model reads its owner
        recipe = p.attrs.quant
        names = [t.name for t in stored]
        parts = [get(n) for n in names]
        scales = [get(t.scale_name) for t in stored if t.scale_name is not None]
        if p.role is ParamRole.EXPERT and count > 1:
            per = count // p.shape[0]

            def stack(ts: list[Tensor], per: int = per) -> Tensor:
                return torch.stack([torch.cat(ts[i : i + per]) for i in range(0, len(ts), per)])

            out[fqn] = stack(parts)
            if scales and recipe is not None:
                out[f"{node.name}.{scale_param_name(p.name, recipe)}"] = stack(scales)
            continue
        out[fqn] = parts[0] if count == 1 else torch.cat(parts)
        if scales and recipe is not None:  # the layout names scales for FP8 weights only
            out[f"{node.name}.{scale_param_name(p.name, recipe)}"] = (
                scales[0] if count == 1 else torch.cat(scales)
            )
    return out
