"""ONNX Runtime (CPU) as a decoding backend: model.onnx for the trunk, mtp.onnx for drafting.
Tensors cross as numpy arrays: ONNX Runtime reads contiguous numpy inputs in place and returns
outputs that wrap its own buffers, so no KV cache is copied on the way in or out (I/O binding
measured slower here: every input changes shape each step, so it only adds bind calls).

Threads: each session has its own intra-op pool (ONNX Runtime's default size unless `threads`
is given), and after a run the pool's threads keep spinning for more work. Speculation
alternates the two sessions call by call, so the drafter's spinning threads competed for the
cores with the trunk's verify step (on a 2-core VM, MTP K=2 decoded at 0.6-0.8x plain speed).
The MTP session therefore stops spinning as soon as its run returns; the trunk session keeps
ONNX Runtime's defaults, so plain decoding is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from glmc.runtime.backend import KV, GraphBackend
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


def _np(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy())
