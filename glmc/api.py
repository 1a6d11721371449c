"""The Python API: resolve a spec, inspect it, build artifacts, load and save checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from glmc import presets
from glmc.errors import CheckpointError, GlmcError
from glmc.export import GLMC_SPEC_FILE, Meta, Target, Weights
from glmc.export import get as get_target
from glmc.export import names as target_names
from glmc.ir import DType, Graph, TrainingAssumptions, format_graph, per_rank_memory, summary
from glmc.outdir import atomic_folder, check_output_folder
from glmc.pipeline import compile_graph, fp8_report, run_pipeline
from glmc.resolve import resolve_spec, trunk_only_without_mtp, weight_dtype
from glmc.resources import check_model
from glmc.spec import ModelSpec
from glmc.version import __version__

if TYPE_CHECKING:
    from glmc.convert import Source

__all__ = [
    "DEFAULT_TARGETS",
    "GLMC_SPEC_FILE",
    "build",
    "build_torch",
    "compile_graph",
    "convert",
    "from_pretrained",
    "inspect",
    "load_torch_artifact",
    "resolve_spec",
    "save_pretrained",
    "target_meta",
    "trunk_only_without_mtp",
]

DEFAULT_TARGETS = ("torch", "hf")  # the deployment targets take minutes; ask for them by name

# GLM-4.5's tokenizer (vocab 151552): <think> / </think> ids, for TensorRT-LLM's relaxed
# acceptance inside the thinking span. Other vocabularies get strict acceptance.
GLM45_VOCAB = 151552
GLM45_THINK_IDS = (151350, 151351)


def inspect(
    spec: ModelSpec | str | Path | dict[str, Any],
    pipeline: str | None = None,
    seq_len: int = 4096,
    training: TrainingAssumptions | None = None,
) -> dict[str, Any]:
    """What `glmc inspect --json` prints: parameter counts, FLOPs and KV-cache bytes per token;
    with a shard pass in `pipeline`, also `parallel`: the mesh, the pipeline stages and each
    stage's per-rank parameter, gradient, optimizer and KV-cache bytes (`training` sets the
    dtypes assumed for the training state)."""
    s = resolve_spec(spec)
    g = compile_graph(s, pipeline)
    info = summary(g, seq_len=seq_len)
    out = {"name": s.name, "pipeline": pipeline or "", "spec": s.model_dump(mode="json"), **info}
    if g.attrs.mesh:
        out["parallel"] = per_rank_memory(g, training)
    return out


def convert(src: str | Path, out: str | Path, pipeline: str | None = None, **options: Any) -> dict[str, Any]:
    """Stream checkpoint folder `src` into `out` in the layout `pipeline` describes (fused, FP8,
    per-rank shards); `options` as for `glmc.convert.convert` (dtype, max_shard_bytes, force,
    progress). Returns the manifest written to `out/glmc_convert.json` with byte counts and time."""
    from glmc.convert import convert as convert_checkpoint

    return convert_checkpoint(src, out, pipeline, **options)


def target_meta(spec: ModelSpec, source: str = "glmc build") -> Meta:
    """The spec-dependent facts a target needs, as plain data (export/ never sees the spec)."""
    return Meta(
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        hf_config=spec.to_hf_config(),
        eos_token_id=tuple(spec.tokens.eos_token_id or [spec.vocab_size - 1]),
        bos_token_id=spec.tokens.bos_token_id,
        pad_token_id=spec.tokens.pad_token_id,
        think_ids=GLM45_THINK_IDS if spec.vocab_size == GLM45_VOCAB else None,
        glmc_version=__version__,
        source=source,
    )


# ---- torch models ---------------------------------------------------------------------------


def build_torch(
    spec: ModelSpec, dtype: torch.dtype = torch.float32, seed: int | None = 0, graph: Graph | None = None
) -> torch.nn.Module:
    """A randomly initialised torch model of `spec` (transformers' init, deterministic per seed),
    built from `graph` when the caller already compiled one (else from `spec`'s lowering)."""
    from glmc.export.torch import build_model

    model = build_model(graph or compile_graph(spec, dtype=ir_dtype(dtype)), dtype=dtype)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model.init_weights(spec.initializer_range, generator=gen)
    model.spec = spec  # type: ignore[assignment]
    return model


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    allow_nonfinite: bool = False,
    dequantize: bool = False,
) -> torch.nn.Module:
    """Load a Hugging Face layout folder (single or sharded safetensors, per-expert names, MTP
    at layer index num_hidden_layers) or a folder written by glmc (its torch artifact, or any
    unsharded `glmc convert` / `glmc build --emit hf` output); `model.spec` is its spec.

    An FP8 folder glmc wrote keeps FP8: the model is built from the graph its
    `glmc_convert.json` records (fused or not), holding `float8_e4m3fn` weights and their fp32
    scales, run by the FP8 path of the torch target; `dequantize=True` gives the plain model
    with the weights dequantised to `dtype` instead (as FP8 folders glmc did not write always
    are). A weight holding NaN or Inf raises `CheckpointError` naming it, unless
    `allow_nonfinite`."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {p}")
    if (p / GLMC_SPEC_FILE).is_file():
        return load_torch_artifact(p, dtype=dtype, allow_nonfinite=allow_nonfinite, dequantize=dequantize)
    ckpt = open_weights(p, dtype=ir_dtype(dtype), action="loading")
    try:
        source = ckpt.source
        if source is not None and source.recipe is not None and source.passes and not dequantize:
            graph = run_pipeline(ckpt.graph, ",".join(source.passes))  # the lowering above, passed
            state = _fp8_state(graph, source, dtype, allow_nonfinite)
        else:
            graph, state = ckpt.graph, ckpt.read(dtype, allow_nonfinite)
    finally:
        ckpt.close()
    return _model(graph, ckpt.spec, state, dtype)


@dataclass
class OpenedWeights:
    """A checkpoint folder opened for reading into the plain lowering of its spec (`graph`,
    lowered once here): names, shapes and dtypes checked, no tensor data read yet."""

    spec: ModelSpec
    graph: Graph
    source: Source | None  # set for a glmc layout (fused, FP8): its logical tensors and passes
    reader: Any  # keys() and meta(name) of the stored tensors; what `read` loads from

    def read(self, dtype: torch.dtype, allow_nonfinite: bool) -> dict[str, torch.Tensor]:
        """The plain model's state (IR parameter names) in `dtype`; FP8 weights dequantised."""
        from glmc.export.hf import from_hf

        if isinstance(self.reader, Path):  # a torch artifact's model.safetensors
            return _read_torch_state(self.reader, self.graph, dtype, allow_nonfinite)
        return from_hf(self.graph, self.reader, dtype=dtype, allow_nonfinite=allow_nonfinite)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def open_weights(
    path: Path, spec: ModelSpec | None = None, dtype: str | None = None, action: str = "loading"
) -> OpenedWeights:
    """Open checkpoint folder `path` (Hugging Face layout, a glmc layout, or a torch artifact
    built without a pipeline) and lower `spec` (default: the folder's) once at IR dtype `dtype`
    (default: the dtype most of its weights are stored in, `glmc.convert.checkpoint_dtype`)."""
    from glmc.convert import checkpoint_dtype, open_source, read_json
    from glmc.export.hf import open_checkpoint, recipe_of
    from glmc.export.hf.target import CONVERT_FILE

    if (path / GLMC_SPEC_FILE).is_file():
        f = path / "model.safetensors"
        with open_checkpoint(f) as reader:
            pipeline = _artifact_pipeline(f)
            if pipeline:
                raise CheckpointError(
                    f"{path} is a torch artifact built with --pipeline {pipeline}; read weights from the hf "
                    "folder of that build, or from a torch artifact built without a pipeline"
                )
            spec = spec or ModelSpec.from_file(path / GLMC_SPEC_FILE)
            graph = compile_graph(spec, dtype=dtype or str(checkpoint_dtype(reader)))
        return OpenedWeights(spec, graph, None, f)
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    if (path / CONVERT_FILE).is_file() or recipe_of(config, str(path / "config.json")) is not None:
        source = open_source(path, dtype=dtype, spec=spec, action=action)  # another layout, or FP8
        return OpenedWeights(source.spec, source.lowered, source, source.tensors)
    spec = spec or resolve_spec(path)
    reader = open_checkpoint(path)
    spec = trunk_only_without_mtp(spec, reader, path, action)
    graph = compile_graph(spec, dtype=dtype or str(checkpoint_dtype(reader, config)))
    return OpenedWeights(spec, graph, None, reader)


def _fp8_state(
    graph: Graph, source: Source, dtype: torch.dtype, allow_nonfinite: bool
) -> dict[str, torch.Tensor]:
    """The FP8 model's state read from `source` as stored (export.torch.fp8.checkpoint_state):
    FP8 weights and fp32 scales as they are, the rest cast to `dtype`. A tensor whose stored
    dtype disagrees with the graph (FP8 where the recorded passes keep high precision, or the
    reverse) is refused, naming it: casting would silently quantise or widen it."""
    from glmc.export.hf import check_finite
    from glmc.export.torch import build_model
    from glmc.export.torch.fp8 import checkpoint_state

    with torch.device("meta"):
        want = build_model(graph, dtype=dtype, device="meta").state_dict()
    got = checkpoint_state(graph, source.raw.__getitem__)
    missing = [k for k in want if k not in got]
    if missing:
        raise CheckpointError(f"{source.path}: the FP8 model's {missing[0]} is not in the checkpoint")
    state = {}
    fp8 = torch.float8_e4m3fn
    for k, w in want.items():
        t = got[k]
        if (t.dtype == fp8) != (w.dtype == fp8):
            raise CheckpointError(
                f"{source.path}: {k} is stored as {t.dtype} but the passes in its glmc_convert.json make it "
                f"{w.dtype}"
            )
        state[k] = t.to(w.dtype) if t.is_floating_point() else t
        if not allow_nonfinite:  # FP8 checked in fp32 (torch has no isfinite for it)
            check_finite(t.float() if t.dtype == fp8 else state[k], k, str(source.path))
    return state


def _model(
    graph: Graph, spec: ModelSpec, state: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.nn.Module:
    """The eval-mode torch model of `graph` holding `state` (assigned, not copied)."""
    from glmc.export.torch import build_model

    with torch.device("meta"):
        model = build_model(graph, dtype=dtype, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    model.spec = spec  # type: ignore[assignment]
    return model.eval()


def save_pretrained(model: torch.nn.Module, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` in the Hugging Face layout (config.json, safetensors shards, index), with
    per-expert tensor names and the MTP layer at index num_hidden_layers. Atomic: the folder
    appears complete or not at all, replacing an existing one (never the current folder, one
    above it, the home folder or a symbolic link: `glmc.outdir.check_output_folder`)."""
    from glmc.export.hf.target import write_hf_checkpoint

    spec: ModelSpec | None = getattr(model, "spec", None)
    if spec is None:
        raise GlmcError(
            "save_pretrained needs a glmc model (one with a .spec), e.g. from glmc.from_pretrained"
        )
    state = model.state_dict()
    graph = compile_graph(spec, dtype=ir_dtype(next(iter(state.values())).dtype))
    with atomic_folder(path, replace=True) as tmp:
        write_hf_checkpoint(Weights(graph, state), tmp, spec.to_hf_config(), max_shard_bytes)
    return Path(path)


def ir_dtype(dt: torch.dtype) -> str:
    """The IR dtype name of a torch floating dtype (the graph's storage dtype)."""
    return str(DType.parse(str(dt)))


# ---- build ----------------------------------------------------------------------------------


def build(
    spec: ModelSpec | str | Path | dict[str, Any],
    out: str | Path,
    pipeline: str | None = None,
    weights: str | Path | None = None,
    emit: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
    force: bool = False,
    dtype: str = "auto",
    progress: Callable[[str], None] | None = None,
    allow_nonfinite: bool = False,
    trtllm_version: str | None = None,
) -> dict[str, Any]:
    """Compile `spec` and write one subfolder per target into `out`, plus `build.json`.

    The spec is lowered once and the pipeline run once; every target receives that graph and
    first checks it: a pass a target cannot honour is refused (GlmcError naming the target, the
    pass and a node) before any folder is made or weight created. Without `weights` the model
    is randomly initialised (deterministic per `seed`); with a checkpoint folder its weights are
    read into that one lowering, checked against the spec, and refused if any holds NaN or Inf
    unless `allow_nonfinite`; its tokenizer, chat template and generation files are carried
    into the hf and trtllm folders (and the tokenizer into onnx). `dtype` "auto" keeps the
    checkpoint's dtype (the one most of its weights are stored in) and is bf16 for a random
    init. `out` is checked before any work (`glmc.outdir.check_output_folder`: never the
    current folder or one above it, never a folder that is, holds or lies inside an input) and
    written atomically."""
    from glmc.export.hf import TORCH_DTYPES, check_finite
    from glmc.export.sidecar import find_sidecars
    from glmc.pipeline import build as parse_pipeline
    from glmc.pipeline import run_passes

    say = progress or (lambda _msg: None)
    chosen = _targets(emit, trtllm_version)
    s = resolve_spec(spec)
    out = Path(out)
    inputs = {"--weights folder": weights, "spec": _spec_path(spec)}
    check_output_folder(out, inputs=inputs, replace=force)  # before any work
    asked = None if dtype == "auto" else str(weight_dtype(dtype))
    passes = parse_pipeline(pipeline) if pipeline else []  # a bad pipeline fails before any reading
    ckpt: OpenedWeights | None = None
    sidecars: tuple[Any, ...] = ()
    try:
        say(f"lowering {s.name}")
        if weights is not None:
            wpath = Path(weights)
            if not wpath.is_dir():
                raise CheckpointError(f"--weights folder not found: {wpath}")
            if resolve_spec(wpath).model_dump(exclude={"name"}) != s.model_dump(exclude={"name"}):
                raise CheckpointError(
                    f"--weights {weights}: its config.json describes a different model than {s.name}"
                )
            sidecars = find_sidecars(wpath)
            # The one lowering: the spec at the checkpoint's dtype (or --dtype), which the
            # weights are read into (a trunk-only checkpoint drops the MTP layers here).
            ckpt = open_weights(wpath, s, asked, action="building")
            s, plain = ckpt.spec, ckpt.graph
        else:
            plain = compile_graph(s, dtype=asked or "bf16")  # the graph the weights follow
        ir = plain.attrs.dtype
        torch_dtype = TORCH_DTYPES[ir]
        graph = run_passes(plain, passes) if passes else plain  # the graph the targets honour
        for target in chosen:
            target.check(graph)  # a pass a target cannot honour fails here, before any output exists
        check_model(
            s, str(ir), "glmc build", weights, graph=plain
        )  # refuse what cannot fit, before allocating
        manifest: dict[str, Any] = {
            "glmc_version": __version__,
            "spec": s.model_dump(mode="json"),
            "pipeline": pipeline or "",
            "dtype": str(ir),
            "weights": str(weights) if weights else f"random(seed={seed})",
            "targets": [t.name for t in chosen],
            "summary": summary(graph),
        }
        note = fp8_report(graph)
        if note:
            manifest["notes"] = [note]
        need = sum(t.size_hint(graph, ir.itemsize) for t in chosen)
        # The temporary folder is made before loading or initialising weights: an unwritable or
        # full output fails now, not after the work.
        with atomic_folder(out, replace=force, inputs=inputs, need_bytes=need) as tmp:
            if ckpt is not None:
                say(f"loading weights from {weights}")
                state = ckpt.read(torch_dtype, allow_nonfinite)
            else:
                say("initialising random weights")
                model = build_torch(s, dtype=torch_dtype, seed=seed, graph=plain)
                state = {k: v.detach() for k, v in model.state_dict().items()}
                if not allow_nonfinite:
                    for k, v in state.items():  # a random init is finite unless the spec's sizes overflow
                        check_finite(v, k, "the randomly initialised model")
            (tmp / "graph.txt").write_text(format_graph(graph))
            meta = replace(target_meta(s), sidecars=sidecars)
            for target in chosen:
                say(f"emitting {target.name}")
                target.emit(graph, Weights(plain, state), tmp / target.name, meta)
            (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        if ckpt is not None:
            ckpt.close()
    return manifest


def _targets(emit: Sequence[str], trtllm_version: str | None) -> list[Target]:
    """The targets `emit` names, in its order, from the registry (`glmc.export.targets()`)."""
    unknown = [t for t in emit if t not in target_names()]
    if unknown:
        raise GlmcError(
            f"unknown target(s) {', '.join(unknown)} in --emit; known targets: {', '.join(target_names())}"
        )
    if not emit:
        raise GlmcError("--emit names no target")
    twice = sorted({t for t in emit if list(emit).count(t) > 1})
    if twice:
        raise GlmcError(f"--emit names {', '.join(twice)} twice")
    if trtllm_version is not None and "trtllm" not in emit:
        raise GlmcError("--trtllm-version applies to --emit trtllm")
    chosen = [get_target(t) for t in emit]
    if trtllm_version is not None:  # the options' TensorRT-LLM release
        chosen = [replace(t, release=trtllm_version) if t.name == "trtllm" else t for t in chosen]  # type: ignore[type-var]
    return chosen


def _spec_path(spec: object) -> Path | None:
    """The file or folder a spec argument names (None for a preset name or an object)."""
    if not isinstance(spec, str | Path) or str(spec) in presets.names():
        return None
    p = Path(spec)
    return p if p.exists() else None


def load_torch_artifact(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    allow_nonfinite: bool = False,
    dequantize: bool = False,
) -> torch.nn.Module:
    """Load the folder the torch target wrote (`glmc build ... --emit torch`), built from the
    graph its recorded pipeline makes (fused, FP8); `dequantize` turns FP8 weights back into
    `dtype` (the model of the pipeline without quantize-fp8). A damaged `model.safetensors`
    (truncated, bad header), missing, unexpected or misshapen tensors and, unless
    `allow_nonfinite`, NaN/Inf weights raise `CheckpointError` naming the file/tensor."""
    p = Path(path)
    spec = ModelSpec.from_file(p / GLMC_SPEC_FILE)
    f = p / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{p}: torch artifact has no model.safetensors")
    pipeline = _artifact_pipeline(f)
    lowered = compile_graph(spec, dtype=ir_dtype(dtype))
    graph = run_pipeline(lowered, pipeline) if pipeline else lowered
    state = _read_torch_state(f, graph, dtype, allow_nonfinite)
    if dequantize and graph.attrs.quantization is not None:
        kept = ",".join(x for x in graph.attrs.passes if not x.startswith("quantize-fp8"))
        state = _dequantized(graph, state, dtype)
        graph = run_pipeline(lowered, kept) if kept else lowered
    return _model(graph, spec, state, dtype)


def _artifact_pipeline(f: Path) -> str:
    """The pipeline a torch artifact's tensors follow (its model.safetensors metadata). The
    framing is validated first (CheckpointError naming the file)."""
    from safetensors import safe_open

    from glmc.export.hf import open_checkpoint
    from glmc.export.torch.target import PIPELINE_KEY

    with open_checkpoint(f), safe_open(str(f), "pt") as header:
        return str((header.metadata() or {}).get(PIPELINE_KEY) or "")


def _read_torch_state(
    f: Path, graph: Graph, dtype: torch.dtype, allow_nonfinite: bool
) -> dict[str, torch.Tensor]:
    """The tensors of a torch artifact's `f` as the state of `build_model(graph)` in `dtype`
    (FP8 weights and fp32 buffers keep their dtypes), every name and shape checked first."""
    from glmc.export.hf import check_finite, open_checkpoint
    from glmc.export.torch import build_model

    with torch.device("meta"):
        want = build_model(graph, dtype=dtype, device="meta").state_dict()
    with open_checkpoint(f) as reader:
        missing = [k for k in want if k not in reader]
        unexpected = [k for k in reader if k not in want]
        if missing or unexpected:
            what = f"lacks {missing[0]}" if missing else f"has an unexpected tensor {unexpected[0]}"
            raise CheckpointError(
                f"{f} does not match {GLMC_SPEC_FILE}: it {what} "
                f"({len(missing)} missing, {len(unexpected)} unexpected)"
            )
        state = {}
        for k, w in want.items():
            shape = reader.meta(k)[0]
            if shape != tuple(w.shape):
                raise CheckpointError(f"{k} has shape {list(shape)} in {f}, expected {list(w.shape)}")
            t = reader[k]
            state[k] = t.to(w.dtype) if t.is_floating_point() else t
            if not allow_nonfinite:  # FP8 checked in fp32 (torch has no isfinite for it)
                check_finite(
                    state[k].float() if state[k].dtype == torch.float8_e4m3fn else state[k], k, str(f)
                )
    return state


def _dequantized(graph: Graph, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` of the FP8 model of `graph` with every FP8 weight dequantised to `dtype` (through
    the dispatch seam the FP8 GEMMs use) and its scales dropped."""
    from glmc.ir.quant import row_segments, scale_param_name
    from glmc.kernels.dispatch import dequantize_fp8

    out = dict(state)
    for fqn, node, p in graph.params():
        recipe = p.attrs.quant
        if recipe is None or fqn not in out:
            continue
        scale = out.pop(f"{node.name}.{scale_param_name(p.name, recipe)}")
        out[fqn] = dequantize_fp8(out[fqn], scale, recipe=recipe, segments=row_segments(p), dtype=dtype)
    return out
