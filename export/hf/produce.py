"""Make one checkpoint tensor (and its FP8 scales) from logical tensors, holding at most the
output and one logical piece at a time: a stacked [E, 2I, H] expert tensor is filled expert
half by expert half, never by first collecting E separate tensors."""

from __future__ import annotations

import torch

from glmc.ir import CheckpointError

from . import fp8
from .layout import OutTensor
from .logical import LogicalSource
from .safetensors_io import TORCH_ST as _ST
from .weights import check_finite


def produce(
    t: OutTensor, src: LogicalSource, dtype: torch.dtype, allow_nonfinite: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """`t` as (name, tensor) pairs: the tensor in `dtype`, or FP8 plus fp32 scales if `t` is
    quantised. Raises CheckpointError naming the logical tensor that cannot be quantised, or
    that holds NaN/Inf in `dtype` (a cast can overflow) unless `allow_nonfinite`. FP8 always
    needs finite values: its scales come from the absolute maximum."""
    if t.recipe is None:
        out = torch.empty(t.shape, dtype=dtype)
        flat, off = out.view(-1), 0
        for pc in t.pieces:
            dest = flat[off : off + pc.numel]
            whole_rows = pc.cols is None or pc.cols == (0, pc.shape[1])
            if whole_rows and src.stored_dtype(pc.source) == _ST.get(dtype):
                src.read(pc.source, pc.rows, out=dest)  # straight from the file into place
            else:
                x = src.read(pc.source, pc.rows)
                if pc.cols is not None:
                    x = x[:, pc.cols[0] : pc.cols[1]]
                dest.copy_(x.reshape(-1))
            if not allow_nonfinite:
                # Checked while the piece is hot in cache, in the dtype written.
                origin = (pc.rows[0], pc.cols[0] if pc.cols is not None else 0)
                check_finite(dest.view(pc.out_shape), pc.source, src.file_of(pc.source), origin)
            off += pc.numel
        return [(t.name, out)]
    assert t.scale_name is not None and t.scale_shape is not None
    q = torch.empty(t.shape, dtype=fp8.FP8)
    s = torch.empty(t.scale_shape, dtype=torch.float32)
    qf, sf = q.view(-1), s.view(-1)
    off = s_off = 0
    for pc in t.pieces:
        x = src.read(pc.source, pc.rows)
        try:
            qp, sp = fp8.quantize(x.reshape(x.shape[0], -1), t.recipe)
        except ValueError as e:
            raise CheckpointError(f"{pc.source}: cannot quantise to FP8: it {e}") from None
        if pc.cols is not None:
            c0, c1 = pc.cols
            qp = qp[:, c0:c1]
            if t.recipe == "block128":
                sp = sp[:, c0 // fp8.BLOCK : -(-c1 // fp8.BLOCK)]
        qf[off : off + pc.numel].copy_(qp.reshape(-1))
        sf[s_off : s_off + sp.numel()].copy_(sp.reshape(-1))
        off += pc.numel
        s_off += sp.numel()
    return [(t.name, q), (t.scale_name, s)]
