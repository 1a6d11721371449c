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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmc.errors import CheckpointError, GlmcError
from glmc.export.hf import TORCH_DTYPES, LogicalSource, StreamingCheckpoint, plan_checkpoint, recipe_of
from glmc.export.hf.target import (
    CONVERT_FILE,
    Layout,
    Progress,
    convert_manifest,
    write_config,
    write_layout,
)
from glmc.export.target import GLMC_SPEC_FILE
from glmc.ir import DType, Graph, format_graph
from glmc.pipeline import compile_graph, run_pipeline
from glmc.resolve import resolve_spec, trunk_only_without_mtp, weight_dtype
from glmc.spec import ModelSpec
from glmc.version import __version__

__all__ = [
    "CONVERT_FILE",
    "DEFAULT_MAX_SHARD_BYTES",
    "Source",
    "convert",
    "open_source",
    "write_config",
    "write_layout",
]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


@dataclass(frozen=True)
class Source:
    """An opened checkpoint: its spec, its lowered graph, the graph it was written from (the
    lowered one, or its fused form), and its logical tensors."""

    path: Path
    spec: ModelSpec
    lowered: Graph
    graph: Graph
    recipe: str | None
    tensors: LogicalSource
    raw: StreamingCheckpoint

    def close(self) -> None:
        self.raw.close()


def open_source(path: str | Path) -> Source:
    """Open an unsharded checkpoint folder in any layout glmc reads, checking every tensor's
    name, shape and dtype against its config (no tensor data is read)."""
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
    lowered = compile_graph(spec, dtype=str(_model_dtype(config)))
    graph = FuseMoE().apply(lowered) if manifest.get("weight_layout", "hf") == "fused" else lowered
    recipe = recipe_of(config, str(p / "config.json"))
    try:
        tensors = LogicalSource(raw, plan_checkpoint(graph), recipe)
    except BaseException:
        raw.close()
        raise
    return Source(p, spec, lowered, graph, recipe, tensors, raw)


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
    from glmc.outdir import atomic_folder, check_output_folder

    src, out = Path(src), Path(out)
    inputs = {"source checkpoint": src}
    check_output_folder(out, inputs=inputs, replace=force)  # before reading anything
    if max_shard_bytes <= 0:
        raise GlmcError(f"--max-shard-size must be positive, got {max_shard_bytes}")
    override = TORCH_DTYPES[weight_dtype(dtype)] if dtype else None
    t0 = time.perf_counter()
    source = open_source(src)
    try:
        # The source's lowering, passed: the spec is lowered once per command.
        graph = run_pipeline(source.lowered, pipeline) if pipeline else source.lowered
        need = Layout(graph, source.tensors, override).total
        with atomic_folder(out, replace=force, inputs=inputs, need_bytes=need) as tmp:
            stats = write_layout(
                graph, source.tensors, tmp, override, max_shard_bytes, progress, allow_nonfinite
            )
            manifest = convert_manifest(graph, pipeline or "", str(src), __version__)
            write_config(source.spec.to_hf_config(), graph, tmp, override)
            (tmp / CONVERT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            (tmp / "graph.txt").write_text(format_graph(graph))
    finally:
        source.close()
    return {**manifest, **stats, "seconds": time.perf_counter() - t0}


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
