"""The `onnx` target: `model.onnx` (+ `mtp.onnx`) with a grown KV cache, which
`genai_config.json` names for ONNX Runtime GenAI, and beside them `model_static.onnx` (+
`mtp_static.onnx`, `verify_static.onnx`), the same steps on a static cache that `glmc generate`
binds in place (verify_static: a greedy speculation round's verify, acceptance, MTP catch-up
and first draft in one graph); fp32 (ONNX Runtime's CPU provider has no bf16 kernels for this
graph)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch

from glmc.ir import Graph

from ..sidecar import TOKENIZER_FILES, copy_sidecars
from ..target import BaseTarget, Meta, Weights, write_runtime_manifest


class OnnxTarget(BaseTarget):
    name: ClassVar[str] = "onnx"
    # Traced from the module of the passed graph: fused parameters, FP8 weights as FLOAT8E4M3FN
    # initializers with DequantizeLinear. Per-rank programs are not exported: shard is refused.
    honours: ClassVar[frozenset[str]] = frozenset({"fuse-moe", "quantize-fp8"})
    why_not: ClassVar[Mapping[str, str]] = {
        "shard": "an ONNX model runs in one process (ONNX has no collectives to place the plan's communication)"
    }

    def emit(self, graph: Graph, weights: Weights, out: Path, meta: Meta) -> None:
        from glmc.export.torch import build_model, passed_state

        from . import export_decoder, export_mtp, genai_config
        from .graphs import export_decoder_static, export_mtp_static, export_verify_static

        out.mkdir(parents=True)
        model = build_model(graph, dtype=torch.float32)  # FP8 weights and their scales stay as they are
        model.load_state_dict(passed_state(graph, weights.state), strict=True)
        model.eval()
        context = graph.attrs.max_position_embeddings
        files = {"decoder": "model.onnx", "decoder_static": "model_static.onnx"}
        export_decoder(model, out / files["decoder"], context)
        export_decoder_static(model, out / files["decoder_static"], context)
        if graph.attrs.num_mtp_layers:
            files["mtp"], files["mtp_static"] = "mtp.onnx", "mtp_static.onnx"
            files["verify_static"] = "verify_static.onnx"
            export_mtp(model, out / files["mtp"], context)
            export_mtp_static(model, out / files["mtp_static"], context)
            export_verify_static(model, out / files["verify_static"], context)
        cfg = genai_config(
            model,
            context_length=context,
            eos_token_id=list(meta.eos_token_id),
            bos_token_id=meta.bos_token_id,
            pad_token_id=meta.pad_token_id,
            mtp_file=files.get("mtp"),
        )
        (out / "genai_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        # ONNX Runtime GenAI reads the tokenizer (tokenizer.json, tokenizer_config.json) from the
        # folder of genai_config.json; generation defaults live in genai_config.json's search.
        copy_sidecars(meta.sidecars, [out], only=TOKENIZER_FILES)
        write_runtime_manifest(out, self.name, meta, files, dtype="float32")
