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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmc.errors import CheckpointError, GlmcError
from glmc.export.hf import (
    TORCH_DTYPES,
    LogicalSource,
    StreamingCheckpoint,
    plan_checkpoint,
    rank_dir,
    ranks,
    recipe_of,
)
from glmc.export.hf.target import (
    CONVERT_FILE,
    Layout,
    Progress,
    convert_manifest,
    write_config,
    write_layout,
)
from glmc.export.sidecar import copy_sidecars, find_sidecars
from glmc.export.target import GLMC_SPEC_FILE
from glmc.ir import DType, Graph, format_graph
from glmc.pipeline import compile_graph, fp8_report, run_pipeline
from glmc.resolve import WEIGHT_DTYPES, resolve_spec, trunk_only_without_mtp, weight_dtype
from glmc.spec import ModelSpec
from glmc.untrusted import load_json, read_text
from glmc.version import __version__

__all__ = [
    "CONVERT_FILE",
    "DEFAULT_MAX_SHARD_BYTES",
    "Source",
    "checkpoint_dtype",
    "convert",
    "open_source",
    "read_json",
    "write_config",
    "write_layout",
]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


@dataclass(frozen=True)
class Source:
    """An opened checkpoint: its spec, its lowered graph, the graph it was written from (the
    lowered one, or its fused form), the passes that made it (from `glmc_convert.json`), and its
    logical tensors."""

    path: Path
    spec: ModelSpec
    lowered: Graph
    graph: Graph
    recipe: str | None
    tensors: LogicalSource
    raw: StreamingCheckpoint
    passes: tuple[str, ...] = ()

    def close(self) -> None:
        self.raw.close()


def open_source(
    path: str | Path, dtype: str | None = None, spec: ModelSpec | None = None, action: str = "converting"
) -> Source:
    """Open an unsharded checkpoint folder in any layout glmc reads, checking every tensor's
    name, shape and dtype against its config (no tensor data is read), and lower its spec once:
    at `dtype` (IR name), or the dtype most of its weights are stored in (`checkpoint_dtype`).
    `spec`, when given, is the caller's spec of the same model (compared by the caller); it is
    lowered instead of the config's, so the caller's graph is this one."""
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
    manifest = read_json(p / CONVERT_FILE) if (p / CONVERT_FILE).is_file() else {}
    if manifest.get("ranks"):
        raise CheckpointError(
            f"{p} holds per-rank shards ({len(manifest['ranks'])} ranks); convert reads unsharded checkpoints "
            "(reassemble the ranks first with glmc.export.hf.assemble)"
        )
    passes = manifest.get("passes") or []
    if not isinstance(passes, list) or not all(isinstance(x, str) for x in passes):
        raise CheckpointError(f"{p / CONVERT_FILE}: 'passes' is not a list of pass spellings")
    config = read_json(p / "config.json")
    spec = spec or resolve_spec(p)
    raw = StreamingCheckpoint(p)
    try:
        spec = trunk_only_without_mtp(spec, raw, p, action)
        ir = dtype or str(checkpoint_dtype(raw, config))
        lowered = compile_graph(spec, dtype=ir)
        graph = FuseMoE().apply(lowered) if manifest.get("weight_layout", "hf") == "fused" else lowered
        recipe = recipe_of(config, str(p / "config.json"))
        tensors = LogicalSource(raw, plan_checkpoint(graph), recipe)
    except BaseException:
        raw.close()
        raise
    return Source(p, spec, lowered, graph, recipe, tensors, raw, tuple(passes))


def checkpoint_dtype(reader: Any, config: dict[str, Any] | None = None) -> DType:
    """The dtype a checkpoint's weights follow (`--dtype auto`): the one most of its
    high-precision elements are stored in (a mixed checkpoint follows its bulk; FP8 weights and
    integer tensors do not count), else config.json's torch_dtype, else bf16. `reader` has
    `keys()` and `meta(name) -> (shape, safetensors dtype)`."""
    counts: dict[DType, int] = {}
    for name in list(reader.keys()):
        shape, st = reader.meta(name)
        dt = DType.from_safetensors(st)
        if dt in WEIGHT_DTYPES:
            counts[dt] = counts.get(dt, 0) + math.prod(shape)
    if counts:
        return max(WEIGHT_DTYPES, key=lambda d: counts.get(d, -1))  # ties: the first in WEIGHT_DTYPES
    return _config_dtype(config or {})


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
    written to `out/glmc_convert.json` plus timing and byte counts. Unquantised weights keep the
    checkpoint's dtype (`checkpoint_dtype`) unless `dtype` (bf16, f16, f32; None or "auto": as
    stored) says otherwise. The source's tokenizer, chat template, generation and license files
    (export.sidecar) are copied into the output folder and every rank folder. Weights holding
    NaN or Inf are refused, naming the tensor, unless `allow_nonfinite`."""
    from glmc.outdir import atomic_folder, check_output_folder

    src, out = Path(src), Path(out)
    inputs = {"source checkpoint": src}
    check_output_folder(out, inputs=inputs, replace=force)  # before reading anything
    if max_shard_bytes <= 0:
        raise GlmcError(f"--max-shard-size must be positive, got {max_shard_bytes}")
    override = TORCH_DTYPES[weight_dtype(dtype)] if dtype not in (None, "auto") else None
    t0 = time.perf_counter()
    source = open_source(src)
    try:
        sidecars = find_sidecars(src)  # refused before any work, like a bad tensor
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
            copied = copy_sidecars(
                sidecars, [tmp, *(tmp / rank_dir(c) for c in ranks(graph) if c is not None)]
            )
    finally:
        source.close()
    note = fp8_report(graph)
    notes = {"notes": [note]} if note else {}
    return {**manifest, **stats, **notes, "sidecars": copied, "seconds": time.perf_counter() - t0}


def _config_dtype(config: dict[str, Any]) -> DType:
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    try:
        dt = DType.parse(str(name))
    except ValueError:
        return DType.BF16
    return dt if dt in WEIGHT_DTYPES else DType.BF16


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config.json, glmc_convert.json) as an object, read under
    glmc.untrusted's rules (regular file, size bound, strict JSON)."""
    data = load_json(read_text(path, "checkpoint file"), str(path))
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
