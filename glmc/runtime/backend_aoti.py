"""AOTInductor packages as a decoding backend.

Static-cache packages (`decoder_static.pt2`, `mtp_static.pt2`, `verify_static.pt2`, see
glmc.export.aoti): one trunk package for prefill, decode and speculative verify, one for the
MTP draft and catch-up steps, any batch; greedy speculation runs each round's verify,
acceptance, catch-up and first draft on `verify_static.pt2` (folders without it: three
calls). `AotiStaticSteps` hands each call the cache and keeps the returned `cache_out`
tensors as the next step's cache: nothing is sliced, masked, copied back or scattered on the
host.

Folders written by earlier glmc versions (`prefill.pt2`, `decode.pt2`, `mtp.pt2`: batch 1,
cache in and grown cache out) run through `glmc.runtime.steps.FunctionalSteps`, a row at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from glmc.errors import CheckpointError
from glmc.export import RUNTIME_FILE
from glmc.runtime.backend import KV, GraphBackend, static_kv
from glmc.runtime.steps import Steps, chain_drafts
from glmc.spec import ModelSpec


class AotiBackend(GraphBackend):
    name = "aoti"

    def __init__(self, folder: Path, spec: ModelSpec, files: dict[str, str]) -> None:
        from torch._inductor import aoti_load_package

        def load(key: str) -> Any:
            return aoti_load_package(str(folder / files[key]))

        self.spec = spec
        self.static = "decoder_static" in files
        if not self.static and not {"prefill", "decode"} <= set(files):
            raise CheckpointError(
                f"{folder / RUNTIME_FILE}: the aoti files name no trunk package "
                "(decoder_static, or prefill and decode)"
            )
        self._trunk: Any = load("decoder_static") if self.static else None
        self._prefill: Any = None if self.static else load("prefill")
        self._decode: Any = None if self.static else load("decode")
        mtp_key = "mtp_static" if self.static else "mtp"
        self._mtp: Any = load(mtp_key) if mtp_key in files else None
        # Folders written before it existed run greedy speculation as three calls a round.
        self._verify: Any = load("verify_static") if self.static and "verify_static" in files else None
        # The earlier packages were compiled for batch 1; the static ones take any batch.
        self.max_batch: int | None = None if self.static else 1

    def static_steps(self, batch: int, length: int) -> Steps:
        return AotiStaticSteps(self, batch, length)

    def forward(
        self, ids: Tensor, positions: Tensor, past: list[KV], mask: Tensor
    ) -> tuple[Tensor, Tensor, list[KV]]:
        """The earlier packages' trunk step: prefill.pt2 on an empty cache, decode.pt2 after."""
        if past[0][0].shape[2] == 0:
            out = self._prefill(ids, mask, positions)
        else:
            out = self._decode(ids, mask, positions, *[t.contiguous() for kv in past for t in kv])
        return out[0], out[1], [(out[i], out[i + 1]) for i in range(2, len(out), 2)]

    def mtp(
        self, ids: Tensor, h: Tensor, positions: Tensor, past: KV, mask: Tensor
    ) -> tuple[Tensor, Tensor, KV]:
        """The earlier packages' MTP step (mtp.pt2)."""
        logits, z, k, v = self._mtp(
            ids, h.contiguous(), mask, positions, past[0].contiguous(), past[1].contiguous()
        )
        return logits, z, (k, v)


class AotiStaticSteps:
    """Static-cache steps on the static packages. The cache is allocated (zeroed) once; each
    step returns an updated copy (an exported program has no in-place inputs), which replaces
    it, so the previous cache is freed as the next one comes back."""

    def __init__(self, backend: AotiBackend, batch: int, length: int) -> None:
        self.backend, self.batch, self.length = backend, batch, length
        spec = backend.spec
        self.cache: list[Tensor] = static_kv(spec, batch, length, spec.num_layers)
        self.mtp_cache = static_kv(spec, batch, length, 1) if backend._mtp is not None else None
        if backend._verify is not None and self.mtp_cache is not None:
            # The loop runs greedy speculation on `greedy_round` where the steps have one.
            self.greedy_round = self._greedy_round

    def trunk(self, ids: Tensor, positions: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        logits, h, *self.cache = self.backend._trunk(ids.contiguous(), positions.contiguous(), *self.cache)
        return logits, h

    def mtp(self, ids: Tensor, h: Tensor, positions: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        assert self.mtp_cache is not None
        logits, z, *self.mtp_cache = self.backend._mtp(
            ids.contiguous(), h.float().contiguous(), positions.contiguous(), *self.mtp_cache
        )
        return logits, z

    def _greedy_round(self, ids: Tensor, positions: Tensor, draft_tokens: int) -> tuple[Tensor, ...]:
        """A greedy speculation round: verify_static.pt2 (verify, acceptance, catch-up, first
        draft), then the K-1 chained drafts on mtp_static.pt2 (the torch backend's
        `greedy_round_static` in 1 + K-1 calls instead of one graph)."""
        assert self.mtp_cache is not None
        out = self.backend._verify(ids.contiguous(), positions.contiguous(), *self.cache, *self.mtp_cache)
        best, accepted, trunk_ok, draft, ok, z, *caches = out
        self.cache, self.mtp_cache = caches[:-2], caches[-2:]
        drafts, draft_ok = chain_drafts(
            self, draft, ok, z, positions[:, :1] + accepted[:, None], draft_tokens
        )
        return best, accepted, drafts, trunk_ok, draft_ok

    def warm_up(self, draft_tokens: int, greedy: bool = False) -> float:
        return 0.0  # nothing compiles at run time: the packages were built ahead of time
