"""What the decoding loop needs from an artifact: `steps(batch, length)`, static-cache steps
(glmc.runtime.steps) for a batch of rows and a cache of `length` positions.

The grown-cache graphs (ONNX Runtime's `model.onnx`, AOTInductor folders of earlier glmc
versions) take a functional KV cache (caches in, grown caches out), as torch tensors on CPU;
`FunctionalSteps` keeps the static cache for them. The static-cache graphs
(`model_static.onnx`, `decoder_static.pt2`) run on their backends' own steps objects.
Shapes: ids/positions [B, S] int64; mask [B, P+S] int64 (1 = a slot the row may see);
logits [B, S, V]; hidden [B, S, H]; each cache entry k, v [B, nkv, P, d].
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
from torch import Tensor

from glmc.runtime.steps import FunctionalSteps, Steps, TorchSteps, compile_step
from glmc.spec import ModelSpec

KV = tuple[Tensor, Tensor]


class Backend(Protocol):
    name: str
    spec: ModelSpec
    max_batch: int | None  # rows one call can take (None: any)

    @property
    def has_mtp(self) -> bool: ...

    def steps(self, batch: int, length: int) -> Steps: ...

    def forget_steps(self, batch: int, length: int) -> None:
        """Drop the kept steps of (batch, length): the next call allocates fresh caches."""
        ...


class FunctionalBackend(Protocol):
    """A backend whose steps take the KV cache and return it grown (the exported graphs)."""

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
    """The emitted torch module (a torch artifact or a Hugging Face folder) on static caches:
    eager, or with `compiled` the fixed-shape decode, verify and MTP steps compiled once per
    shape (CUDA graphs on CUDA). Its dtype is the module's."""

    name = "torch"
    max_batch: int | None = None
    # Steps of at most this many tokens per row are the fixed-shape ones (decode, verify, MTP).
    max_fixed_tokens = 9

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, compiled: bool = False) -> None:
        self.model: Any = cast(Any, model.eval())
        self.spec = spec
        self.compiled = compiled
        self._steps: dict[tuple[int, int], TorchSteps] = {}
        self.compiled_trunk: Any = None
        self.compiled_mtp: Any = None
        self.compiled_round: Any = None
        if compiled:
            cuda = self.model.model.embed_tokens.weight.device.type == "cuda"
            # One graph per (kind, batch, tokens, cache length): more than Dynamo's default
            # of 8 per function once batch sizes and draft counts vary in one process.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.compiled_trunk = compile_step(self.model.forward_static, cuda)
            self.compiled_mtp = compile_step(self.model.mtp_static, cuda)
            self.compiled_round = compile_step(self.model.greedy_round_static, cuda)

    @property
    def has_mtp(self) -> bool:
        return len(self.model.model.mtp) > 0

    def steps(self, batch: int, length: int) -> Steps:
        """Caches are kept per (batch, length) so repeated calls reuse them (and, compiled,
        the graphs captured on their addresses)."""
        key = (batch, length)
        if key not in self._steps:
            self._steps[key] = TorchSteps(self, batch, length)
        return self._steps[key]

    def forget_steps(self, batch: int, length: int) -> None:
        self._steps.pop((batch, length), None)


class GraphBackend:
    """Shared by the exported-graph backends (AOTInductor, ONNX Runtime): caches shaped from
    the spec, and an MTP step only when the artifact carries the MTP graph."""

    spec: ModelSpec
    _mtp: object | None
    max_batch: int | None = None
    static = False  # the artifact has static-cache graphs (run by `static_steps`)

    def steps(self, batch: int, length: int) -> Steps:
        if not self.static:
            return FunctionalSteps(self, batch, length)
        # Kept per (batch, length), like the torch backend's: repeated calls reuse the buffers.
        kept: dict[tuple[int, int], Steps] = self.__dict__.setdefault("_kept_steps", {})
        if (batch, length) not in kept:
            kept[(batch, length)] = self.static_steps(batch, length)
        return kept[(batch, length)]

    def forget_steps(self, batch: int, length: int) -> None:
        self.__dict__.get("_kept_steps", {}).pop((batch, length), None)

    def static_steps(self, batch: int, length: int) -> Steps:
        raise NotImplementedError(f"{type(self).__name__} has no static-cache steps")

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


def static_kv(spec: ModelSpec, batch: int, length: int, layers: int) -> list[Tensor]:
    """Zeroed fp32 static caches of `layers` layers, flat (k0, v0, k1, v1, ...), each
    [batch, nkv, length, d]: what the static-cache graphs take."""
    a = spec.attention
    return [torch.zeros(batch, a.num_kv_heads, length, a.head_dim) for _ in range(2 * layers)]
