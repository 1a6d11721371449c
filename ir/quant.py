"""FP8 annotations: which recipe a GEMM weight uses and the shape of its scales.

Two recipes, both E4M3 weights with dynamic activation scales computed at run time:
- `block128` (DeepSeek-V3 format): one fp32 `*_scale_inv` per 128 x 128 weight block, shape
  [ceil(rows/128), ceil(cols/128)]; activations quantised per 1 x 128 tile.
- `channel` (compressed-tensors, the GLM-4.5-FP8 release): one fp32 `*_scale` per output row,
  shape [rows, 1]; activations quantised per token.

A fused weight (q/k/v rows, gate/up halves, every expert of a stacked tensor) is quantised
segment by segment, so each segment's scales are exactly those of the separate Hugging Face
tensor it came from: the scale rows of a fused weight are the concatenation of its segments'
scale rows. (With 128-aligned segments, as in GLM-4.5, this is the plain block layout.)
"""

from __future__ import annotations

from .graph import Param, ParamRole

BLOCK = 128
RECIPES = ("block128", "channel")
ACTIVATION_SCHEME = {"block128": "dynamic_1x128", "channel": "dynamic_per_token"}
_SUFFIX = {"block128": "_scale_inv", "channel": "_scale"}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_suffix(recipe: str) -> str:
    return _SUFFIX[recipe]


def scale_param_name(name: str, recipe: str) -> str:
    """`q_proj.weight` -> `q_proj.weight_scale_inv`; `experts.gate_up_proj` -> `..._scale_inv`."""
    return name + _SUFFIX[recipe]


def row_segments(p: Param) -> tuple[int, ...]:
    """The independently quantised parts of the row dim (dim -2) of a GEMM weight: the fused
    components, or for stacked experts' gate_up the gate and up halves of each expert."""
    if p.attrs.segments:
        return p.attrs.segments
    rows = p.shape[-2]
    if p.role is ParamRole.EXPERT and p.name.endswith("gate_up_proj"):
        return (rows // 2, rows // 2)
    return (rows,)


def segment_scale_rows(rows: int, recipe: str) -> int:
    return cdiv(rows, BLOCK) if recipe == "block128" else rows


def scale_cols(cols: int, recipe: str) -> int:
    return cdiv(cols, BLOCK) if recipe == "block128" else 1


def scale_shape(p: Param, recipe: str) -> tuple[int, ...]:
    """Shape of the scales of weight `p` ([..., rows, cols]) under `recipe`."""
    rows = sum(segment_scale_rows(s, recipe) for s in row_segments(p))
    return (*p.shape[:-2], rows, scale_cols(p.shape[-1], recipe))
