"""FP8 E4M3 weight quantisation for the two recipes (glmc.ir.quant describes the formats).

scale = max(amax, 1e-12) / 448 in fp32 per 128 x 128 block (`block128`, stored as the
DeepSeek-style `weight_scale_inv`, a dequantisation multiplier) or per output row (`channel`,
compressed-tensors `weight_scale`); q = round-to-nearest-even(clamp(w / scale, -448, 448)).
- An all-zero block gets a tiny finite scale and stays zero; huge values stay finite because
  amax / 448 is finite for every finite fp32 amax; partial blocks at the edges (shapes not
  divisible by 128) take the amax of the elements that exist, i.e. zero padding, as DeepSeek-V3
  does. Non-finite weights are refused: no scale can represent them.
- The same convention as kernels/fp8.py, so the runtime kernels and the converted checkpoints
  agree bit for bit. Work proceeds in row chunks to bound temporary memory on large weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_EPS = 1e-12
BLOCK = 128
_CHUNK_ROWS = 8 * BLOCK


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scale_from_amax(amax: Tensor) -> Tensor:
    return amax.clamp(min=AMAX_EPS) / FP8_MAX


def _expand_blocks(s: Tensor, rows: int, cols: int) -> Tensor:
    """Per-block scales [nb, kb] -> per-element [rows, cols] (one broadcast copy)."""
    nb, kb = s.shape
    return s[:, None, :, None].expand(nb, BLOCK, kb, BLOCK).reshape(nb * BLOCK, kb * BLOCK)[:rows, :cols]


def quantize(w: Tensor, recipe: str) -> tuple[Tensor, Tensor]:
    """w [R, C] (any float dtype) -> (fp8 [R, C], fp32 scales: [ceil(R/128), ceil(C/128)] for
    block128, [R, 1] for channel). Raises ValueError on non-finite input."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {list(w.shape)}")
    if recipe not in ("block128", "channel"):
        raise ValueError(f"unknown FP8 recipe {recipe!r}")
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=FP8)
    if recipe == "channel":
        s = torch.empty(rows, 1, dtype=torch.float32)
    else:
        s = torch.empty(_cdiv(rows, BLOCK), _cdiv(cols, BLOCK), dtype=torch.float32)
    for r0 in range(0, rows, _CHUNK_ROWS):
        r1 = min(rows, r0 + _CHUNK_ROWS)
        # Few passes over the data: amax and amin on the weight as stored (exact in fp32), one
        # divide that also widens to fp32, an in-place clamp, the rounding cast.
        x = w[r0:r1]
        dims: tuple[int, ...] = (1,)
        if recipe == "channel":
            v = x
        else:
            nb, kb = _cdiv(r1 - r0, BLOCK), _cdiv(cols, BLOCK)
            if (nb * BLOCK, kb * BLOCK) != (r1 - r0, cols):  # partial edge blocks: zero padding
                x = F.pad(x, (0, kb * BLOCK - cols, 0, nb * BLOCK - (r1 - r0)))
            v, dims = x.reshape(nb, BLOCK, kb, BLOCK), (1, 3)
        amax = torch.maximum(v.amax(dims, keepdim=True), -v.amin(dims, keepdim=True)).float()
        if not bool(torch.isfinite(amax).all()):  # inf and nan both reach the block's amax
            raise ValueError("has non-finite values (inf or nan), which FP8 scales cannot represent")
        sc = _scale_from_amax(amax)
        y = torch.div(v, sc).clamp_(-FP8_MAX, FP8_MAX)  # fp32, like the kernels' quantiser
        if recipe == "channel":
            s[r0:r1] = sc
        else:
            s[r0 // BLOCK : r0 // BLOCK + sc.shape[0]] = sc.view(sc.shape[0], sc.shape[2])
            y = y.view(nb * BLOCK, kb * BLOCK)
        q[r0:r1] = y[: r1 - r0, :cols]
    return q, s


def dequantize(q: Tensor, s: Tensor, recipe: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `quantize` up to FP8 rounding: fp8 x scale, computed in fp32."""
    rows, cols = q.shape
    if recipe == "block128":
        return (q.float() * _expand_blocks(s.float(), rows, cols)).to(dtype)
    if recipe == "channel":
        return (q.float() * s.float()).to(dtype)
    raise ValueError(f"unknown FP8 recipe {recipe!r}")
