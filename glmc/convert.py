"""`glmc convert`: stream a checkpoint into the layout a pipeline describes.

SRC is a Hugging Face layout folder (config.json + safetensors), or any unsharded folder glmc
wrote (fused and/or FP8, recognised by `glmc_convert.json` and the quantization_config). The
target is the graph of the spec after the pipeline: without fuse-moe the output keeps the
Hugging Face names serving stacks load; with fuse-moe it holds stacked experts and fused
q/k/v and gate/up; with quantize-fp8 FP8 weights plus scales and the matching
quantization_config; with shard one folder per rank (`pp{s}-ep{e}-tp{t}`) beside a
config.json for the whole model.

Memory: tensors are read with positioned reads (no memory maps), each output tensor is built
from one logical piece at a time and streamed to its shard file as soon as it is complete, so
the peak is about one output tensor plus one input piece, not the checkpoint. Everything is
checked before any data is read (names, shapes, dtypes, the plan), the output is written to a
temporary folder that replaces OUT only when complete, and every error names the tensor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmc.errors import CheckpointError, GlmcError
from glmc.export.hf import (
    TORCH_DTYPES,
    LogicalSource,
    OutTensor,
    Planned,
    StreamingCheckpoint,
    StreamingWriter,
    plan_checkpoint,
    produce,
    quantization_config,
    rank_dir,
    ranks,
    recipe_of,
    unquantized_modules,
)
from glmc.export.hf.stream_io import TORCH_ST
from glmc.ir import DType, Graph, ParamRole, format_graph
from glmc.lower import lower
from glmc.spec import ModelSpec

CONVERT_FILE = "glmc_convert.json"  # describes a folder glmc convert wrote: layout, plan, ranks
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor just written)


@dataclass(frozen=True)
class Source:
    """An opened checkpoint: its spec, the graph it was written from, and its logical tensors."""

    path: Path
    spec: ModelSpec
    graph: Graph
    recipe: str | None
    tensors: LogicalSource
    raw: StreamingCheckpoint

    def close(self) -> None:
        self.raw.close()


def open_source(path: str | Path) -> Source:
    """Open an unsharded checkpoint folder in any layout glmc reads, checking every tensor's
    name, shape and dtype against its config (no tensor data is read)."""
    from glmc.api import GLMC_SPEC_FILE, resolve_spec, trunk_only_without_mtp
    from glmc.passes import FuseMoE

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {p}")
    if not (p / "config.json").is_file():
        extra = (
            " (a glmc torch artifact; convert reads Hugging Face layout folders)"
            if (p / GLMC_SPEC_FILE).is_file()
            else ""
        )
        raise CheckpointError(f"{p} has no config.json{extra}")
    manifest = _read_json(p / CONVERT_FILE) if (p / CONVERT_FILE).is_file() else {}
    if manifest.get("ranks"):
        raise CheckpointError(
            f"{p} holds per-rank shards ({len(manifest['ranks'])} ranks); convert reads unsharded checkpoints "
            "(reassemble the ranks first with glmc.export.hf.assemble)"
        )
    config = _read_json(p / "config.json")
    spec = resolve_spec(p)
    raw = StreamingCheckpoint(p)
    spec = trunk_only_without_mtp(spec, raw, p, "converting")
    graph = lower(spec, dtype=str(_model_dtype(config)))
    if manifest.get("weight_layout", "hf") == "fused":
        graph = FuseMoE().apply(graph)
    recipe = recipe_of(config, str(p / "config.json"))
    try:
        tensors = LogicalSource(raw, plan_checkpoint(graph), recipe)
    except BaseException:
        raw.close()
        raise
    return Source(p, spec, graph, recipe, tensors, raw)


def convert(
    src: str | Path,
    out: str | Path,
    pipeline: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: Progress | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Convert checkpoint folder `src` into `out` following `pipeline`; returns the manifest
    written to `out/glmc_convert.json` plus timing and byte counts. Weights holding NaN or Inf
    are refused, naming the tensor, unless `allow_nonfinite`."""
    from glmc.api import _torch_dtype, compile_graph
    from glmc.outdir import atomic_folder, check_output_folder

    src, out = Path(src), Path(out)
    inputs = {"source checkpoint": src}
    check_output_folder(out, inputs=inputs, replace=force)  # before reading anything
    if max_shard_bytes <= 0:
        raise GlmcError(f"--max-shard-size must be positive, got {max_shard_bytes}")
    override = _torch_dtype(dtype) if dtype else None
    t0 = time.perf_counter()
    source = open_source(src)
    try:
        graph = compile_graph(source.spec, pipeline, dtype=str(source.graph.attr("dtype")))
        need = _Layout(graph, source.tensors, override).total
        with atomic_folder(out, replace=force, inputs=inputs, need_bytes=need) as tmp:
            stats = write_layout(
                graph, source.tensors, tmp, override, max_shard_bytes, progress, allow_nonfinite
            )
            manifest = _manifest(graph, pipeline or "", str(src))
            write_config(source.spec, graph, tmp, override)
            (tmp / CONVERT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            (tmp / "graph.txt").write_text(format_graph(graph))
    finally:
        source.close()
    return {**manifest, **stats, "seconds": time.perf_counter() - t0}


class _Layout:
    """Every rank's tensors of `graph`, their output dtypes and byte counts (metadata only)."""

    def __init__(self, graph: Graph, tensors: LogicalSource, override: torch.dtype | None) -> None:
        model_dtype = TORCH_DTYPES[DType.parse(str(graph.attr("dtype")))]
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
    layout = _Layout(graph, tensors, override)
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


def write_config(spec: ModelSpec, graph: Graph, out: Path, override: torch.dtype | None = None) -> None:
    cfg = spec.to_hf_config()
    cfg["torch_dtype"] = str(override or TORCH_DTYPES[DType.parse(str(graph.attr("dtype")))]).removeprefix(
        "torch."
    )
    recipe = graph.attr("quantization", None)
    if recipe is not None:
        cfg["quantization_config"] = quantization_config(recipe, unquantized_modules(graph))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


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


def _manifest(graph: Graph, pipeline: str, source: str) -> dict[str, Any]:
    from glmc import __version__

    mesh = graph.attr("mesh", None)
    rank_list = [{"dir": rank_dir(c), **c} for c in ranks(graph) if c is not None]
    return {
        "glmc_version": __version__,
        "source": source,
        "pipeline": pipeline,
        "passes": list(graph.attr("passes", ())),
        "weight_layout": graph.attr("weight_layout", "hf"),
        "quantization": graph.attr("quantization", None),
        "mesh": dict(mesh) if mesh else None,
        "pp_stages": [list(s) for s in graph.attr("pp_stages", ())],
        "ranks": rank_list,
    }


def _model_dtype(config: dict[str, Any]) -> DType:
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    try:
        dt = DType.parse(str(name))
    except ValueError:
        return DType.BF16
    return dt if dt in (DType.F32, DType.BF16, DType.F16) else DType.BF16


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
