"""Static-cache steps: what the decoding loop calls, one object per (batch, cache length).

Every step writes the keys and values of its tokens into a preallocated cache at their
positions (slot t holds position t of each row) and attends over the slots at or before each
query's position. Rows of a batch therefore advance independently (different prompt lengths,
different numbers of accepted drafts) while every tensor keeps its shape from step to step.
Stale entries (padding of a shorter prompt, rejected drafts, a padded MTP catch-up) sit at
slots past a row's committed tokens, where no query looks before the row's next step writes
them again: steps run in position order and each writes its own slots before attending.
(A masked slot still enters attention as 0 x its value, so a NaN or Inf left there would
spread: after a refusal of non-finite logits the loop drops the backend's kept steps.)

- `TorchSteps`: the torch module's `forward_static` / `mtp_static`, and `greedy_round` (a
  whole greedy speculation round, `greedy_round_static`); the fixed-shape decode, verify, MTP
  and round steps optionally `torch.compile(fullgraph=True)`d ("reduce-overhead", i.e. CUDA
  graphs, on CUDA). Prefill (one variable-length call) stays eager.
- `FunctionalSteps`: exported graphs that take a cache and return it grown (AOTInductor and
  ONNX folders built before their static-cache graphs existed). The static cache lives here;
  each step hands the graph the slots before the batch's furthest start, masked per row, and
  copies the new entries back by position. ONNX folders with `model_static.onnx` run on
  `glmc.runtime.backend_onnx.OnnxStaticSteps` instead (the static cache bound in place), and
  AOTInductor folders with `decoder_static.pt2` on `glmc.runtime.backend_aoti.AotiStaticSteps`.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
from torch import Tensor

KV = tuple[Tensor, Tensor]


class Steps(Protocol):
    batch: int
    length: int

    def trunk(self, ids: Tensor, positions: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        """ids, positions [B, S] -> (logits [B, S, V], hidden [B, S, H]); writes the trunk cache.
        `prefill`: a one-off, variable-length call (never compiled)."""
        ...

    def mtp(self, ids: Tensor, h: Tensor, positions: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        """MTP layer 0 -> (draft logits [B, S, V], MTP hidden [B, S, H]); writes the MTP cache."""
        ...

    def warm_up(self, draft_tokens: int, greedy: bool = False) -> float:
        """Run (and compile) every fixed-shape step the loop will use; returns its seconds.
        `greedy`: speculation will run on `greedy_round` where the steps have one."""
        ...


class GreedyRounds(Protocol):
    """Steps that run a whole greedy speculation round in one call (see
    GLMForCausalLM.greedy_round_static for the contract)."""

    def greedy_round(self, ids: Tensor, positions: Tensor, draft_tokens: int) -> tuple[Tensor, ...]:
        """(best [B, K+1], accepted [B], drafts [B, K], trunk_ok [B, K+1], draft_ok [B, K])."""
        ...


def chain_drafts(
    steps: Steps, first: Tensor, first_ok: Tensor, z: Tensor, at: Tensor, draft_tokens: int
) -> tuple[Tensor, Tensor]:
    """Greedy drafts 2..K after an exported verify step's first draft `first` [B] (its logits
    finite: `first_ok` [B]), each an MTP step on the previous draft and MTP hidden state (`z`
    [B, 1, H] to start) at `at` + j, `at` [B, 1] being each row's last committed position (the
    loop in GLMForCausalLM.greedy_round_static, one call a draft). Returns (drafts [B, K],
    draft_ok [B, K])."""
    drafts, draft_ok = [first], [first_ok]
    for j in range(1, draft_tokens):
        logits, z = steps.mtp(drafts[-1][:, None], z, at + j)
        drafts.append(logits[:, 0].argmax(-1))
        draft_ok.append(logits[:, 0].isfinite().all(-1))
    return torch.stack(drafts, 1), torch.stack(draft_ok, 1)


def _scatter(cache: Tensor, new: Tensor, positions: Tensor) -> None:
    """cache [B, nkv, T, d][b, :, positions[b, s]] = new [B, nkv, S, d][b, :, s]."""
    cache.scatter_(2, positions[:, None, :, None].expand_as(new), new)


class FunctionalSteps:
    """A static cache over a backend whose `forward` / `mtp` take the cache and return it grown
    (the calling convention of the exported graphs, see glmc.runtime.backend)."""

    def __init__(self, backend: Any, batch: int, length: int) -> None:
        self.backend, self.batch, self.length = backend, batch, length
        self.cache = [_like(k, batch, length) for k, _ in backend.empty_cache()]
        self.mtp_cache = _like(backend.empty_mtp_cache()[0], batch, length) if backend.has_mtp else None

    def _call(self, positions: Tensor, cache: list[tuple[Tensor, Tensor]]) -> tuple[list[KV], Tensor]:
        # Slots before the furthest row's start; a row that starts earlier masks the rest.
        p = int(positions[:, 0].max())
        s = positions.shape[1]
        past = [(k[:, :, :p], v[:, :, :p]) for k, v in cache]
        seen = torch.arange(p)[None, :] < positions[:, :1]
        mask = torch.cat((seen, torch.ones(self.batch, s, dtype=torch.bool)), 1).to(torch.int64)
        return past, mask

    def _store(self, cache: list[tuple[Tensor, Tensor]], grown: list[KV], positions: Tensor) -> None:
        s = positions.shape[1]
        for (k, v), (gk, gv) in zip(cache, grown, strict=True):
            _scatter(k, gk[:, :, -s:], positions)
            _scatter(v, gv[:, :, -s:], positions)

    def trunk(self, ids: Tensor, positions: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        past, mask = self._call(positions, self.cache)
        logits, h, grown = self.backend.forward(ids, positions, past, mask)
        self._store(self.cache, grown, positions)
        return logits, h

    def mtp(self, ids: Tensor, h: Tensor, positions: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        assert self.mtp_cache is not None
        past, mask = self._call(positions, [self.mtp_cache])
        logits, z, grown = self.backend.mtp(ids, h, positions, past[0], mask)
        self._store([self.mtp_cache], [grown], positions)
        return logits, z

    def warm_up(self, draft_tokens: int, greedy: bool = False) -> float:
        return 0.0  # nothing compiles at run time: the graphs were built ahead of time


def _like(k: Tensor, batch: int, length: int) -> tuple[Tensor, Tensor]:
    """Zeroed k, v [batch, nkv, length, d] shaped like an empty cache entry [1, nkv, 0, d]."""
    shape = (batch, k.shape[1], length, k.shape[3])
    return torch.zeros(shape, dtype=k.dtype), torch.zeros(shape, dtype=k.dtype)


class TorchSteps:
    """Static caches of the torch module, and its steps: eager for prefill, compiled (when
    `compiled`) for the fixed-shape decode, verify and MTP steps. The fixed-shape steps run the
    routed experts on the static-shape path (each token gathers its k experts' weights: exactly
    the active bytes, no data-dependent shapes, so they compile whole and capture as CUDA
    graphs); prefill keeps the grouped path, which is cheaper for many tokens."""

    def __init__(self, backend: Any, batch: int, length: int) -> None:
        model = backend.model
        self.backend, self.model, self.batch, self.length = backend, model, batch, length
        self.cache = model.static_cache(batch, length)
        self.mtp_cache = model.static_cache(batch, length, mtp=True)[0] if backend.has_mtp else None
        self.device = model.model.embed_tokens.weight.device
        self.cuda = self.device.type == "cuda"
        if backend.compiled and self.cuda:
            # CUDA graphs replay fixed addresses: the caches must not be copied in per call.
            for t in [*(t for kv in self.cache for t in kv), *(self.mtp_cache or ())]:
                torch._dynamo.mark_static_address(t)
        # Flags the fixed-shape steps turn on: the routed experts' static-shape path and, compiled
        # on a CPU, attention as plain matmuls per kv head (Attention._attend's grouped form):
        # on the demo model of bench/generate.py that compiled 3-8% faster per decode step and
        # 8-14% per greedy round than the CPU flash-attention kernel, whose cost grows with the
        # round's K+1 queries. Eager keeps SDPA (fewer ops: 6% faster there).
        self._flags: list[tuple[Any, str]] = [
            (m, "static_shapes") for m in model.modules() if hasattr(m, "static_shapes")
        ]
        if backend.compiled and not self.cuda:
            self._flags += [(m, "grouped") for m in model.modules() if hasattr(m, "grouped")]
        self._warm: set[tuple[str, int]] = set()

    def _run(self, fn: Any, eager: Any, prefill: bool, *args: Any) -> tuple[Tensor, Tensor]:
        logits, h = self._step(fn, eager, prefill, *(self._on_device(a) for a in args))
        # Token choice runs on the CPU (its seeded generator is a CPU one); h stays on the device.
        return logits.float().cpu(), h

    def _on_device(self, a: Any) -> Any:
        return a.to(self.device) if isinstance(a, Tensor) else a

    def _step(self, fn: Any, eager: Any, prefill: bool, *args: Any) -> tuple[Tensor, ...]:
        if prefill:
            return eager(*args)
        from glmc.kernels import use_kernels

        for m, flag in self._flags:
            setattr(m, flag, True)
        try:
            # The router in plain torch: a Triton router is an opaque op to a CUDA graph's capture.
            with use_kernels("torch"):
                if not self.backend.compiled:
                    return eager(*args)
                if self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                out = fn(*args)
        finally:
            for m, flag in self._flags:
                setattr(m, flag, False)
        # CUDA graph outputs are overwritten by the next replay of the same graph.
        return tuple(t.clone() for t in out) if self.cuda else out

    def trunk(self, ids: Tensor, positions: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        return self._run(
            self.backend.compiled_trunk, self.model.forward_static, prefill, ids, positions, self.cache
        )

    def mtp(self, ids: Tensor, h: Tensor, positions: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        return self._run(
            self.backend.compiled_mtp, self.model.mtp_static, prefill, ids, h, positions, self.mtp_cache
        )

    def greedy_round(self, ids: Tensor, positions: Tensor, draft_tokens: int) -> tuple[Tensor, ...]:
        """One greedy speculation round in one call (GLMForCausalLM.greedy_round_static),
        compiled as one graph when the backend compiles; the results come back on the CPU."""
        assert self.mtp_cache is not None
        out = self._step(
            self.backend.compiled_round,
            self.model.greedy_round_static,
            False,
            self._on_device(ids),
            self._on_device(positions),
            self.cache,
            self.mtp_cache,
            draft_tokens,
        )
        return tuple(t.cpu() for t in out)

    def warm_up(self, draft_tokens: int, greedy: bool = False) -> float:
        """Compile and run each fixed-shape step once (three times for CUDA graphs, which record
        on a later call) on dummy tokens at the first slots: the prefill overwrites them, and
        any slot it does not is past every row's tokens until a later step writes it."""
        if not self.backend.compiled:
            return 0.0
        t0 = time.perf_counter()
        b = self.batch
        shapes = [("trunk", 1)] if draft_tokens == 0 else [("trunk", draft_tokens + 1)]
        if draft_tokens and greedy:
            # The round, and the first round's chained drafts (MTP on one token per row).
            shapes = [("round", draft_tokens + 1), ("mtp", 1)]
        elif draft_tokens:
            shapes += [("mtp", 1), ("mtp", draft_tokens + 1)]
        hidden = self.model.model.norm.weight.shape[0]
        dtype = self.model.model.embed_tokens.weight.dtype
        device = self.model.model.embed_tokens.weight.device
        if all(shape in self._warm for shape in shapes):
            return 0.0  # every step compiled on an earlier call: nothing to report
        for kind, s in shapes:
            if (kind, s) in self._warm:
                continue
            ids = torch.zeros(b, s, dtype=torch.int64, device=device)
            pos = torch.arange(s, device=device).expand(b, s).contiguous()
            for _ in range(3 if self.cuda else 1):
                if kind == "trunk":
                    self.trunk(ids, pos)
                elif kind == "round":
                    self.greedy_round(ids, pos, draft_tokens)
                else:
                    self.mtp(ids, torch.zeros(b, s, hidden, dtype=dtype, device=device), pos)
            self._warm.add((kind, s))
        return time.perf_counter() - t0


def compile_step(fn: Any, cuda: bool) -> Any:
    """One compiled step function. Static shapes: a (batch, tokens, cache length) never seen
    before compiles its own graph, so a call with new sizes pays a compile, never a slower
    dynamic-shape kernel."""
    return torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None)
