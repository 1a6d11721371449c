"""AOTInductor packages as a decoding backend: prefill.pt2 for the first (empty-cache) step,
decode.pt2 for every later trunk step (decode and speculative verify), mtp.pt2 for drafting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from glmc.runtime.backend import KV, GraphBackend
from glmc.spec import ModelSpec


class AotiBackend(GraphBackend):
    name = "aoti"
    max_batch: int | None = 1  # the packages are compiled for batch 1 (glmc.export.aoti)

    def __init__(self, folder: Path, spec: ModelSpec, files: dict[str, str]) -> None:
        from torch._inductor import aoti_load_package

        self.spec = spec
        self._prefill: Any = aoti_load_package(str(folder / files["prefill"]))
        self._decode: Any = aoti_load_package(str(folder / files["decode"]))
        self._mtp: Any = aoti_load_package(str(folder / files["mtp"])) if "mtp" in files else None

    def forward(
        self, ids: Tensor, positions: Tensor, past: list[KV], mask: Tensor
    ) -> tuple[Tensor, Tensor, list[KV]]:
        if past[0][0].shape[2] == 0:
            out = self._prefill(ids, mask, positions)
        else:
            out = self._decode(ids, mask, positions, *[t.contiguous() for kv in past for t in kv])
        return out[0], out[1], [(out[i], out[i + 1]) for i in range(2, len(out), 2)]

    def mtp(
        self, ids: Tensor, h: Tensor, positions: Tensor, past: KV, mask: Tensor
    ) -> tuple[Tensor, Tensor, KV]:
        logits, z, k, v = self._mtp(
            ids, h.contiguous(), mask, positions, past[0].contiguous(), past[1].contiguous()
        )
        return logits, z, (k, v)
