"""The `torch` target: glmc's own layout. `model.safetensors` under the torch module's names
(stacked experts), the spec (`glmc_spec.json`) and the printed graph; `glmc.from_pretrained`
and `glmc generate` load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from glmc.ir import Graph, format_graph, summary

from ..target import GLMC_SPEC_FILE, BaseTarget, Meta, Weights


class TorchTarget(BaseTarget):
    name: ClassVar[str] = "torch"
    # The module is built from the weights' graph (the unpassed one): fused and FP8 storage are
    # written by the hf target; the passes stay recorded in graph.txt.
    honours: ClassVar[frozenset[str]] = frozenset({"fuse-moe", "quantize-fp8", "shard"})

    def size_hint(self, graph: Graph, itemsize: int) -> int:
        return int(summary(graph)["params"]["in_memory"]) * itemsize  # the MTP copies are not held twice

    def emit(self, graph: Graph, weights: Weights, out: Path, meta: Meta) -> None:
        from glmc.export.hf import write_safetensors

        out.mkdir(parents=True)
        write_safetensors(out / "model.safetensors", dict(weights.state), metadata={"format": "pt"})
        (out / GLMC_SPEC_FILE).write_text(json.dumps(dict(meta.spec), indent=2) + "\n")
        (out / "graph.txt").write_text(format_graph(graph))
