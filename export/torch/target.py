"""The `torch` target: glmc's own layout. `model.safetensors` under the torch module's names
(stacked experts), the spec (`glmc_spec.json`) and the printed graph; `glmc.from_pretrained`
and `glmc generate` load it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

from glmc.ir import Graph, ParamRole, format_graph

from ..target import GLMC_SPEC_FILE, BaseTarget, Meta, Weights

PIPELINE_KEY = "glmc_pipeline"  # model.safetensors metadata: the passes its tensors follow


class TorchTarget(BaseTarget):
    name: ClassVar[str] = "torch"
    # The state is the passed graph's (export.torch.passed_state): fused parameters, FP8
    # weights with their scales; the loader rebuilds that graph from the recorded pipeline.
    honours: ClassVar[frozenset[str]] = frozenset({"fuse-moe", "quantize-fp8", "shard"})

    def size_hint(self, graph: Graph, itemsize: int) -> int:
        # The tensors the module holds (not the MTP copies): FP8 weights 1 byte, scales fp32.
        held = 0
        for _, _, p in graph.params():
            if p.tied_to is None:
                size = 1 if p.dtype.is_float8 else 4 if p.role is ParamRole.SCALE else itemsize
                held += math.prod(p.shape) * size
        return held

    def emit(self, graph: Graph, weights: Weights, out: Path, meta: Meta) -> None:
        from glmc.export.hf import write_safetensors
        from glmc.export.torch import passed_state

        state = passed_state(graph, weights.state)
        out.mkdir(parents=True)
        pipeline = ",".join(str(x) for x in graph.attrs.passes)
        write_safetensors(out / "model.safetensors", state, metadata={"format": "pt", PIPELINE_KEY: pipeline})
        (out / GLMC_SPEC_FILE).write_text(json.dumps(dict(meta.spec), indent=2) + "\n")
        (out / "graph.txt").write_text(format_graph(graph))
