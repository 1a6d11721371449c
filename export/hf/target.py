"""The `hf` target: the Hugging Face layout folder that transformers, vLLM and SGLang load, or,
after a weight-changing pipeline (fuse-moe, quantize-fp8, shard), that layout: fused tensors,
FP8 weights with their scales and the matching `quantization_config`, one folder per rank.
`glmc convert` writes through the same functions (`write_layout`), streaming from a checkpoint
instead of from memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from glmc.ir import Graph, ParamRole, summary

from ..sidecar import copy_sidecars
from ..target import BaseTarget, Meta, Weights
from .layout import OutTensor, plan_checkpoint, rank_dir, ranks, unquantized_modules
from .logical import DictCheckpoint, LogicalSource
from .produce import produce
from .quant_config import quantization_config
from .safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    TORCH_DTYPES,
    TORCH_ST,
    Planned,
    StreamingWriter,
    write_checkpoint,
)
from .weights import to_hf

CONVERT_FILE = "glmc_convert.json"  # describes a folder in a passed layout: passes, plan, ranks

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor just written)


class HfTarget(BaseTarget):
    name: ClassVar[str] = "hf"
    honours: ClassVar[frozenset[str]] = frozenset({"fuse-moe", "quantize-fp8", "shard"})

    def size_hint(self, graph: Graph, itemsize: int) -> int:
        params = int(summary(graph)["params"]["checkpoint"])  # the MTP copies included
        return params * (1 if graph.attrs.quantization is not None else itemsize)

    def emit(self, graph: Graph, weights: Weights, out: Path, meta: Meta) -> None:
        out.mkdir(parents=True)
        if not changes_layout(graph):
            write_hf_checkpoint(weights, out, meta.hf_config)
            copy_sidecars(meta.sidecars, [out])  # servable as written: tokenizer, chat template
            return
        # The pipeline changes the checkpoint (fused, FP8 or per-rank): write it the way
        # `glmc convert` does, from the Hugging Face tensors of the weights' own graph.
        tensors = LogicalSource(
            DictCheckpoint(dict(to_hf(weights.graph, weights.state))), plan_checkpoint(weights.graph), None
        )
        write_layout(graph, tensors, out)
        write_config(meta.hf_config, graph, out)
        manifest = convert_manifest(graph, ",".join(graph.attrs.passes), meta.source, meta.glmc_version)
        (out / CONVERT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        copy_sidecars(meta.sidecars, [out, *(out / rank_dir(c) for c in ranks(graph) if c is not None)])


def changes_layout(graph: Graph) -> bool:
    """Whether the passes that ran change how the checkpoint is stored (names, dtypes, ranks)."""
    a = graph.attrs
    return a.weight_layout is not None or a.quantization is not None or bool(a.mesh)


def write_hf_checkpoint(
    weights: Weights, out: Path, hf_config: Mapping[str, Any], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """The plain Hugging Face layout of `weights` (per-expert names, MTP at num_hidden_layers)
    plus config.json naming the weights' dtype."""
    write_checkpoint(to_hf(weights.graph, weights.state), out, max_shard_bytes=max_shard_bytes)
    cfg = dict(hf_config)
    cfg["torch_dtype"] = str(next(iter(weights.state.values())).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


class Layout:
    """Every rank's tensors of `graph`, their output dtypes and byte counts (metadata only)."""

    def __init__(self, graph: Graph, tensors: LogicalSource, override: torch.dtype | None) -> None:
        model_dtype = TORCH_DTYPES[graph.attrs.dtype]
        self.plans = [(coords, plan_checkpoint(graph, coords)) for coords in ranks(graph)]
        self.dtypes = {
            t.name: _out_dtype(t, tensors, override, model_dtype) for _, plan in self.plans for t in plan
        }
        self.planned = {id(plan): _planned(plan, self.dtypes) for _, plan in self.plans}
        self.total = sum(p.nbytes for plan in self.planned.values() for p in plan)


def write_layout(
    graph: Graph,
    tensors: LogicalSource,
    out: Path,
    override: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, int]:
    """Write the checkpoint of `graph` (every rank) into `out`, reading from `tensors`."""
    layout = Layout(graph, tensors, override)
    done = n_tensors = 0
    for coords, plan in layout.plans:
        dest = out if coords is None else out / rank_dir(coords)
        writer = StreamingWriter(dest, layout.planned[id(plan)], max_shard_bytes)
        try:
            for t in plan:
                for name, tensor in produce(t, tensors, layout.dtypes[t.name], allow_nonfinite):
                    writer.write(name, tensor)
                    done += tensor.numel() * tensor.element_size()
                    n_tensors += 1
                    if progress is not None:
                        progress(done, layout.total, name)
            writer.finish()
        finally:
            writer.abort()
    return {"tensors": n_tensors, "bytes_written": done, "ranks": len(layout.plans)}


def write_config(
    hf_config: Mapping[str, Any], graph: Graph, out: Path, override: torch.dtype | None = None
) -> None:
    """config.json of the layout: the model's dtype (or `override`) and, for FP8, the
    `quantization_config` listing every GEMM left in high precision."""
    cfg = dict(hf_config)
    cfg["torch_dtype"] = str(override or TORCH_DTYPES[graph.attrs.dtype]).removeprefix("torch.")
    recipe = graph.attrs.quantization
    if recipe is not None:
        cfg["quantization_config"] = quantization_config(recipe, unquantized_modules(graph))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def convert_manifest(graph: Graph, pipeline: str, source: str, glmc_version: str) -> dict[str, Any]:
    """`glmc_convert.json`: which passes made this layout, its mesh, stages and rank folders."""
    mesh = graph.attrs.mesh
    rank_list = [{"dir": rank_dir(c), **c} for c in ranks(graph) if c is not None]
    return {
        "glmc_version": glmc_version,
        "source": source,
        "pipeline": pipeline,
        "passes": list(graph.attrs.passes),
        "weight_layout": graph.attrs.weight_layout or "hf",
        "quantization": graph.attrs.quantization,
        "mesh": dict(mesh) if mesh else None,
        "pp_stages": [list(s) for s in graph.attrs.pp_stages],
        "ranks": rank_list,
    }


def _out_dtype(
    t: OutTensor, src: LogicalSource, override: torch.dtype | None, model: torch.dtype
) -> torch.dtype:
    """FP8 for quantised tensors; the router bias stays fp32; else the requested dtype, else
    the model dtype config.json names, so written dtypes and config.json agree. One exception
    without a request: a router weight stored in fp32 stays fp32 (transformers keeps
    `gate.weight` in fp32 whatever the model dtype, and saves it so). An unchanged tensor is
    copied bit for bit."""
    if t.recipe is not None:
        return torch.float8_e4m3fn
    if t.role is ParamRole.ROUTER_BIAS:
        return torch.float32
    if override is not None:
        return override
    if t.role is ParamRole.ROUTER and src.stored_dtype(t.pieces[0].source) == "F32":
        return torch.float32
    return model


def _planned(plan: list[OutTensor], dtypes: dict[str, torch.dtype]) -> list[Planned]:
    out = []
    for t in plan:
        out.append(Planned(t.name, t.shape, TORCH_ST[dtypes[t.name]]))
        if t.scale_name is not None and t.scale_shape is not None:
            out.append(Planned(t.scale_name, t.scale_shape, "F32"))
    return out
