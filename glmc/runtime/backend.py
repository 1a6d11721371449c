"""What the decoding loop needs from an artifact: the trunk step and the MTP step over a
functional KV cache (caches in, grown caches out), as torch tensors on CPU.

Shapes: ids/positions [1, S] int64; mask [1, P+S] int64 (all ones: one stream, no padding);
logits [1, S, V]; hidden [1, S, H]; each cache entry k, v [1, nkv, P, d].
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from glmc.spec import ModelSpec

KV = tuple[Tensor, Tensor]


class Backend(Protocol):
    name: str
    spec: ModelSpec

    @property
    def has_mtp(self) -> bool: ...

    def empty_cache(self) -> list[KV]: ...

    def empty_mtp_cache(self) -> KV: ...

    def forward(
        self, ids: Tensor, positions: Tensor, past: list[KV], mask: Tensor
    ) -> tuple[Tensor, Tensor, list[KV]]:
        """Trunk over new tokens: (logits, final hidden state, grown caches)."""
        ...

    def mtp(
        self, ids: Tensor, h: Tensor, positions: Tensor, past: KV, mask: Tensor
    ) -> tuple[Tensor, Tensor, KV]:
        """MTP layer 0: `ids` are the tokens after the positions whose hidden states are `h`."""
        ...


class TorchBackend:
    """The emitted torch module (a torch artifact or a Hugging Face folder), eager, fp32."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, spec: ModelSpec) -> None:
        self.model = model.eval()
        self.spec = spec

    @property
    def has_mtp(self) -> bool:
        return len(self.model.model.mtp) > 0  # type: ignore[union-attr, arg-type]

    def empty_cache(self) -> list[KV]:
        return self.model.empty_cache(1)  # type: ignore[operator]

    def empty_mtp_cache(self) -> KV:
        return self.model.empty_cache(1, mtp=True)[0]  # type: ignore[operator]

    @torch.inference_mode()
    def forward(
        self, ids: Tensor, positions: Tensor, past: list[KV], mask: Tensor
    ) -> tuple[Tensor, Tensor, list[KV]]:
        return self.model.forward_cached(ids, positions, past, mask)  # type: ignore[operator]

    @torch.inference_mode()
    def mtp(
        self, ids: Tensor, h: Tensor, positions: Tensor, past: KV, mask: Tensor
    ) -> tuple[Tensor, Tensor, KV]:
        return self.model.mtp_cached(ids, h, positions, past, mask)  # type: ignore[operator]


class GraphBackend:
    """Shared by the exported-graph backends (AOTInductor, ONNX Runtime): caches shaped from
    the spec, and an MTP step only when the artifact carries the MTP graph."""

    spec: ModelSpec
    _mtp: object | None

    @property
    def has_mtp(self) -> bool:
        return self._mtp is not None

    def empty_cache(self) -> list[KV]:
        a = self.spec.attention
        return empty_kv(self.spec.num_layers, a.num_kv_heads, a.head_dim)

    def empty_mtp_cache(self) -> KV:
        a = self.spec.attention
        return empty_kv(1, a.num_kv_heads, a.head_dim)[0]


def empty_kv(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32) -> list[KV]:
    return [(torch.zeros(1, kv_heads, 0, head_dim, dtype=dtype),) * 2 for _ in range(layers)]
