"""The `torch-trt` target: ExportedPrograms with static-shape routing for Torch-TensorRT."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from glmc.ir import Graph

from ..target import BaseTarget, Meta, Weights, write_runtime_manifest


class TorchTrtTarget(BaseTarget):
    name: ClassVar[str] = "torch-trt"
    # Exported from the module of the weights' graph: no fused or FP8 storage, one process.
    honours: ClassVar[frozenset[str]] = frozenset()
    why_not: ClassVar[Mapping[str, str]] = {"shard": "a Torch-TensorRT engine runs in one process"}

    def emit(self, graph: Graph, weights: Weights, out: Path, meta: Meta) -> None:
        from . import export_programs

        out.mkdir(parents=True)
        # TensorRT's dynamo path is strongly typed: the program's dtype is the engine's precision.
        dtype = next(v.dtype for k, v in weights.state.items() if not k.endswith("e_score_correction_bias"))
        model = weights.module(dtype)
        files = export_programs(
            model,  # type: ignore[arg-type]
            out,
            graph.attrs.max_position_embeddings,
            mtp=graph.attrs.num_mtp_layers > 0,
        )
        write_runtime_manifest(out, self.name, meta, files, dtype=str(dtype).removeprefix("torch."))
