"""The `onnx` target: `model.onnx` (+ `mtp.onnx`) with KV cache, fp32 (ONNX Runtime's CPU
provider has no bf16 kernels for this graph), and `genai_config.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch

from glmc.ir import Graph

from ..target import BaseTarget, Meta, Weights, write_runtime_manifest


class OnnxTarget(BaseTarget):
    name: ClassVar[str] = "onnx"
    # Traced from the module of the weights' graph: fused or FP8 storage and per-rank programs
    # are not exported, so those passes are refused.
    honours: ClassVar[frozenset[str]] = frozenset()

    def emit(self, graph: Graph, weights: Weights, out: Path, meta: Meta) -> None:
        from . import export_decoder, export_mtp, genai_config

        out.mkdir(parents=True)
        model = weights.module(torch.float32)
        context = int(graph.attr("max_position_embeddings"))
        files = {"decoder": "model.onnx"}
        export_decoder(model, out / files["decoder"], context)  # type: ignore[arg-type]
        if graph.attr("num_mtp_layers", 0):
            files["mtp"] = "mtp.onnx"
            export_mtp(model, out / files["mtp"], context)  # type: ignore[arg-type]
        cfg = genai_config(
            model,  # type: ignore[arg-type]
            context_length=context,
            eos_token_id=list(meta.eos_token_id),
            bos_token_id=meta.bos_token_id,
            pad_token_id=meta.pad_token_id,
            mtp_file=files.get("mtp"),
        )
        (out / "genai_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_runtime_manifest(out, self.name, meta, files, dtype="float32")
