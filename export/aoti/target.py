"""The `aoti` target: AOTInductor packages compiled for this machine's CPU, in fp32."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch

from glmc.ir import Graph

from ..target import BaseTarget, Meta, Weights, write_runtime_manifest


class AotiTarget(BaseTarget):
    name: ClassVar[str] = "aoti"
    # Compiled from the module of the weights' graph: no fused or FP8 storage, one process.
    honours: ClassVar[frozenset[str]] = frozenset()
    why_not: ClassVar[Mapping[str, str]] = {
        "quantize-fp8": "AOTInductor compiles the model to C++, and glmc's FP8 dequantise op is a Python "
        "custom op with no C++ kernel to link",
        "fuse-moe": "the package is compiled from the Hugging Face layout module",
        "shard": "an AOTInductor package runs in one process",
    }

    def emit(self, graph: Graph, weights: Weights, out: Path, meta: Meta) -> None:
        from . import export_aoti

        out.mkdir(parents=True)
        model = weights.module(torch.float32)
        files = export_aoti(
            model,  # type: ignore[arg-type]
            out,
            graph.attrs.max_position_embeddings,
            mtp=graph.attrs.num_mtp_layers > 0,
        )
        write_runtime_manifest(out, self.name, meta, files, dtype="float32", device="cpu")
