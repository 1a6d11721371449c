"""ONNX Runtime (CPU) as a decoding backend: model.onnx for the trunk, mtp.onnx for drafting.
On these grown-cache graphs tensors cross as numpy arrays: ONNX Runtime reads contiguous numpy
inputs in place and returns outputs that wrap its own buffers (I/O binding measured slower on
them: every input changes shape each step, so it only adds bind calls).

Threads: each session has its own intra-op pool (ONNX Runtime's default size unless `threads`
is given), and after a run the pool's threads keep spinning for more work. Speculation
alternates the two sessions call by call, so the drafter's spinning threads competed for the
cores with the trunk's verify step (on a 2-core VM, MTP K=2 decoded at 0.6-0.8x plain speed).
The MTP session therefore stops spinning as soon as its run returns; the trunk session keeps
ONNX Runtime's defaults, so plain decoding is unchanged.

Static-cache graphs (`model_static.onnx`, `mtp_static.onnx`, `verify_static.onnx`, written
beside the grown-cache graphs that onnxruntime-genai's genai_config names): when the artifact
has them, the decoding loop runs on `OnnxStaticSteps`, which binds every input and output by
address (I/O binding): the cache goes in where it lies and the updated cache comes out into a
second preallocated buffer, the two swapping roles each step, so nothing is sliced, copied or
scattered on the host. With `verify_static.onnx`, greedy speculation runs each round's verify,
acceptance, MTP catch-up and first draft as one call, then chains the further drafts on
`mtp_static.onnx` (folders without it: three calls a round).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from glmc.runtime.backend import KV, GraphBackend, static_kv
from glmc.runtime.steps import Steps, chain_drafts
from glmc.spec import ModelSpec

# ONNX Runtime session config key (onnxruntime_session_options_config_keys.h).
FORCE_SPINNING_STOP = "session.force_spinning_stop"


class OnnxBackend(GraphBackend):
    name = "onnx"

    def __init__(self, folder: Path, spec: ModelSpec, files: dict[str, str], threads: int = 0) -> None:
        """`threads`: intra-op threads per session (0: ONNX Runtime's default, one per core)."""
        import onnxruntime as ort

        def options(stop_spinning: bool) -> Any:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = threads
            if stop_spinning:
                opts.add_session_config_entry(FORCE_SPINNING_STOP, "1")
            return opts

        self.spec = spec
        self.files = dict(files)
        providers = ["CPUExecutionProvider"]
        self._decoder: Any = ort.InferenceSession(
            str(folder / files["decoder"]), options(False), providers=providers
        )
        self._mtp: Any = (
            ort.InferenceSession(str(folder / files["mtp"]), options(True), providers=providers)
            if "mtp" in files
            else None
        )
        self._dec_in = [i.name for i in self._decoder.get_inputs()]
        self._mtp_in = [i.name for i in self._mtp.get_inputs()] if self._mtp is not None else []
        # Artifacts built before the static-cache graphs existed lack them: FunctionalSteps then.
        self.static = "decoder_static" in files and ("mtp" not in files or "mtp_static" in files)
        self._static: Any = (
            ort.InferenceSession(str(folder / files["decoder_static"]), options(False), providers=providers)
            if self.static
            else None
        )
        self._mtp_static: Any = (
            ort.InferenceSession(str(folder / files["mtp_static"]), options(True), providers=providers)
            if self.static and "mtp_static" in files
            else None
        )
        # Greedy rounds alternate it with the MTP session (the chained drafts): it stops spinning too.
        self._verify_static: Any = (
            ort.InferenceSession(str(folder / files["verify_static"]), options(True), providers=providers)
            if self._mtp_static is not None and "verify_static" in files
            else None
        )

    def static_steps(self, batch: int, length: int) -> Steps:
        return OnnxStaticSteps(self, batch, length)

    def forward(
        self, ids: Tensor, positions: Tensor, past: list[KV], mask: Tensor
    ) -> tuple[Tensor, Tensor, list[KV]]:
        feeds = [ids, mask, positions, *[t for kv in past for t in kv]]
        out = self._decoder.run(None, dict(zip(self._dec_in, map(_np, feeds), strict=True)))
        t = [torch.from_numpy(o) for o in out]
        return t[0], t[1], [(t[i], t[i + 1]) for i in range(2, len(t), 2)]

    def mtp(
        self, ids: Tensor, h: Tensor, positions: Tensor, past: KV, mask: Tensor
    ) -> tuple[Tensor, Tensor, KV]:
        feeds = [ids, h, mask, positions, past[0], past[1]]
        out = self._mtp.run(None, dict(zip(self._mtp_in, map(_np, feeds), strict=True)))
        logits, z, k, v = (torch.from_numpy(o) for o in out)
        return logits, z, (k, v)


class OnnxStaticSteps:
    """Static-cache steps on the `*_static.onnx` graphs: (ids, positions, cache) -> (logits,
    hidden, updated cache), every tensor bound by address. Two cache sets per graph: a step
    reads one and writes the other (ONNX has no in-place outputs, and binding an output onto
    its own input would leave correctness to ONNX Runtime's kernels), then they swap. The
    verify graph reads and writes both the trunk's and the MTP layer's sets.

    The fixed-shape steps (decode, verify, MTP, greedy round) keep their I/O bindings: one per
    step shape and cache parity, over input and output buffers that live as long as the steps,
    so a step copies its ids and positions in and runs (binding the 30 tensors of a glm-small
    step anew cost about 0.35 ms). Prefill shapes vary per call and bind afresh."""

    def __init__(self, backend: OnnxBackend, batch: int, length: int) -> None:
        self.backend, self.batch, self.length = backend, batch, length
        self._vocab, self._hidden = backend.spec.vocab_size, backend.spec.hidden_size

        def caches(layers: int) -> list[list[Tensor]]:
            return [static_kv(backend.spec, batch, length, layers) for _ in range(2)]

        self.cache = caches(backend.spec.num_layers)
        self.mtp_cache = caches(1) if backend._mtp_static is not None else None
        self._parity = {"trunk": 0, "mtp": 0}  # which cache set the next step reads
        self._bound: dict[tuple[object, ...], tuple[Any, list[Tensor], tuple[Tensor, ...]]] = {}
        if backend._verify_static is not None:
            # The loop runs greedy speculation on `greedy_round` where the steps have one.
            self.greedy_round = self._greedy_round

    def _binding(
        self,
        sess: Any,
        key: tuple[object, ...],
        inputs: list[Tensor],
        outputs: Callable[[], tuple[Tensor, ...]],
        src: list[Tensor],
        dst: list[Tensor],
        keep: bool,
    ) -> tuple[Any, list[Tensor], tuple[Tensor, ...]]:
        """(binding, its input buffers, its output buffers before the cache) for this step shape
        and cache parity: the step reads the caches `src` and writes `dst`."""
        if key in self._bound:
            return self._bound[key]
        ins = [t.clone() for t in inputs] if keep else inputs
        outs = outputs()
        io = sess.io_binding()
        for i, t in zip(sess.get_inputs(), [*ins, *src], strict=True):
            _bind(io.bind_input, i.name, t)
        for o, t in zip(sess.get_outputs(), [*outs, *dst], strict=True):
            _bind(io.bind_output, o.name, t)
        if keep:
            self._bound[key] = (io, ins, outs)
        return io, ins, outs

    def _run(
        self, sess: Any, kind: str, inputs: list[Tensor], cache: list[list[Tensor]], prefill: bool
    ) -> tuple[Tensor, Tensor]:
        s, parity = inputs[0].shape[1], self._parity[kind]

        def outputs() -> tuple[Tensor, ...]:
            return torch.empty(self.batch, s, self._vocab), torch.empty(self.batch, s, self._hidden)

        io, buffers, (logits, h) = self._binding(
            sess, (kind, s, parity), inputs, outputs, cache[parity], cache[1 - parity], keep=not prefill
        )
        _copy_in(buffers, inputs)
        sess.run_with_iobinding(io)
        self._parity[kind] ^= 1  # the written set is the one the next step reads
        return logits.clone(), h.clone()

    def trunk(self, ids: Tensor, positions: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        feeds = [ids.contiguous(), positions.contiguous()]
        return self._run(self.backend._static, "trunk", feeds, self.cache, prefill)

    def mtp(self, ids: Tensor, h: Tensor, positions: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        assert self.mtp_cache is not None
        feeds = [ids.contiguous(), h.float().contiguous(), positions.contiguous()]
        return self._run(self.backend._mtp_static, "mtp", feeds, self.mtp_cache, prefill)

    def _greedy_round(self, ids: Tensor, positions: Tensor, draft_tokens: int) -> tuple[Tensor, ...]:
        """A greedy speculation round: verify_static.onnx (verify, acceptance, catch-up, first
        draft), then the K-1 chained drafts on mtp_static.onnx (the torch backend's
        `greedy_round_static` in 1 + K-1 calls)."""
        assert self.mtp_cache is not None
        b, s = ids.shape
        pt, pm = self._parity["trunk"], self._parity["mtp"]

        def outputs() -> tuple[Tensor, ...]:
            i64, flag = torch.int64, torch.bool
            return (
                torch.empty(b, s, dtype=i64),  # best
                torch.empty(b, dtype=i64),  # accepted
                torch.empty(b, s, dtype=flag),  # trunk_ok
                torch.empty(b, dtype=i64),  # draft
                torch.empty(b, dtype=flag),  # draft_ok
                torch.empty(b, 1, self._hidden),  # the MTP hidden state the chain starts from
            )

        feeds = [ids.contiguous(), positions.contiguous()]
        io, buffers, outs = self._binding(
            self.backend._verify_static,
            ("verify", s, pt, pm),
            feeds,
            outputs,
            [*self.cache[pt], *self.mtp_cache[pm]],
            [*self.cache[1 - pt], *self.mtp_cache[1 - pm]],
            keep=True,
        )
        _copy_in(buffers, feeds)
        self.backend._verify_static.run_with_iobinding(io)
        self._parity["trunk"] ^= 1
        self._parity["mtp"] ^= 1
        best, accepted, trunk_ok, draft, ok, z = (t.clone() for t in outs)
        drafts, draft_ok = chain_drafts(
            self, draft, ok, z, positions[:, :1] + accepted[:, None], draft_tokens
        )
        return best, accepted, drafts, trunk_ok, draft_ok

    def warm_up(self, draft_tokens: int, greedy: bool = False) -> float:
        return 0.0  # built ahead of time; ONNX Runtime plans its buffers on the first run


def _copy_in(buffers: list[Tensor], inputs: list[Tensor]) -> None:
    """A kept binding's input buffers take this call's values (a fresh binding reads them)."""
    for buf, t in zip(buffers, inputs, strict=True):
        if buf is not t:
            buf.copy_(t)


_ELEMENT = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_}


def _bind(bind: Any, name: str, t: Tensor) -> None:
    bind(name, "cpu", 0, _ELEMENT[t.dtype], list(t.shape), t.data_ptr())


def _np(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy())
