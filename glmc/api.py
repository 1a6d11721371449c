"""The Python API: resolve a spec, inspect it, build artifacts, load and save checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from glmc import presets
from glmc.errors import CheckpointError, GlmcError
from glmc.export import GLMC_SPEC_FILE, Meta, Target, Weights
from glmc.export import get as get_target
from glmc.export import names as target_names
from glmc.ir import DType, Graph, TrainingAssumptions, format_graph, per_rank_memory, summary
from glmc.outdir import atomic_folder, check_output_folder
from glmc.pipeline import compile_graph, run_pipeline
from glmc.resolve import resolve_spec, trunk_only_without_mtp, weight_dtype
from glmc.resources import check_model
from glmc.spec import ModelSpec
from glmc.version import __version__

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
    if g.attr("mesh", None) is not None:
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
    path: str | Path, dtype: torch.dtype = torch.float32, allow_nonfinite: bool = False
) -> torch.nn.Module:
    """Load a Hugging Face layout folder (single or sharded safetensors, per-expert names, MTP
    at layer index num_hidden_layers) or a folder written by glmc (its torch artifact, or any
    unsharded `glmc convert` output: fused, FP8 block128 or channel, dequantised on the CPU);
    `model.spec` is its spec. A weight holding NaN or Inf raises `CheckpointError` naming it,
    unless `allow_nonfinite`."""
    from glmc.convert import open_source
    from glmc.export.hf import TensorReader, from_hf, open_checkpoint, recipe_of
    from glmc.export.hf.target import CONVERT_FILE
    from glmc.export.torch import build_model

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {p}")
    if (p / GLMC_SPEC_FILE).is_file():
        return load_torch_artifact(p, dtype=dtype, allow_nonfinite=allow_nonfinite)
    spec = resolve_spec(p)
    reader: TensorReader
    source = None
    config = json.loads((p / "config.json").read_text())
    if (p / CONVERT_FILE).is_file() or recipe_of(config, str(p / "config.json")) is not None:
        source = open_source(p)  # another layout, or FP8: read as (dequantised) Hugging Face tensors
        reader = source.tensors
    else:
        reader = open_checkpoint(p)
    spec = trunk_only_without_mtp(spec, reader, p, "loading")
    graph = compile_graph(spec, dtype=ir_dtype(dtype))
    try:
        state = from_hf(graph, reader, dtype=dtype, allow_nonfinite=allow_nonfinite)
    finally:
        if source is not None:
            source.close()
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
    dtype: str = "bf16",
    progress: Callable[[str], None] | None = None,
    allow_nonfinite: bool = False,
    trtllm_version: str | None = None,
) -> dict[str, Any]:
    """Compile `spec` and write one subfolder per target into `out`, plus `build.json`.

    The spec is lowered once and the pipeline run once; every target receives that graph and
    first checks it: a pass a target cannot honour is refused (GlmcError naming the target, the
    pass and a node) before any folder is made or weight created. Without `weights` the model
    is randomly initialised (deterministic per `seed`); with a Hugging Face checkpoint folder
    its weights are loaded and checked against the spec, and refused if any holds NaN or Inf
    unless `allow_nonfinite`. `out` is checked before any work (`glmc.outdir.check_output_folder`:
    never the current folder or one above it, never a folder that is, holds or lies inside an
    input) and written atomically."""
    from glmc.export.hf import TORCH_DTYPES, check_finite

    say = progress or (lambda _msg: None)
    chosen = _targets(emit, trtllm_version)
    s = resolve_spec(spec)
    out = Path(out)
    inputs = {"--weights folder": weights, "spec": _spec_path(spec)}
    check_output_folder(out, inputs=inputs, replace=force)  # before any work
    ir = weight_dtype(dtype)
    torch_dtype = TORCH_DTYPES[ir]
    say(f"lowering {s.name}")
    plain = compile_graph(s, dtype=str(ir))  # the graph the weights follow
    graph = run_pipeline(plain, pipeline) if pipeline else plain  # the graph the targets honour
    for target in chosen:
        target.check(graph)  # a pass a target cannot honour fails here, before any output exists
    check_model(s, str(ir), "glmc build", weights, graph=plain)  # refuse what cannot fit, before allocating
    manifest: dict[str, Any] = {
        "glmc_version": __version__,
        "spec": s.model_dump(mode="json"),
        "pipeline": pipeline or "",
        "weights": str(weights) if weights else f"random(seed={seed})",
        "targets": [t.name for t in chosen],
        "summary": summary(graph),
    }
    need = sum(t.size_hint(graph, ir.itemsize) for t in chosen)
    # The temporary folder is made before loading or initialising weights: an unwritable or
    # full output fails now, not after the work.
    with atomic_folder(out, replace=force, inputs=inputs, need_bytes=need) as tmp:
        if weights is not None:
            say(f"loading weights from {weights}")
            model = from_pretrained(weights, dtype=torch_dtype, allow_nonfinite=allow_nonfinite)
            loaded: ModelSpec = model.spec  # type: ignore[assignment]
            if loaded.model_dump(exclude={"name"}) != s.model_dump(exclude={"name"}):
                raise CheckpointError(
                    f"--weights {weights}: its config.json describes a different model than {s.name}"
                )
        else:
            say("initialising random weights")
            model = build_torch(s, dtype=torch_dtype, seed=seed, graph=plain)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if weights is None and not allow_nonfinite:
            for k, v in state.items():  # a random init is finite unless the spec's sizes overflow
                check_finite(v, k, "the randomly initialised model")
        (tmp / "graph.txt").write_text(format_graph(graph))
        meta = target_meta(s)
        for target in chosen:
            say(f"emitting {target.name}")
            target.emit(graph, Weights(plain, state), tmp / target.name, meta)
        (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
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
    path: str | Path, dtype: torch.dtype = torch.float32, allow_nonfinite: bool = False
) -> torch.nn.Module:
    """Load the folder the torch target wrote (`glmc build ... --emit torch`). A damaged
    `model.safetensors` (truncated, bad header), missing, unexpected or misshapen tensors and,
    unless `allow_nonfinite`, NaN/Inf weights raise `CheckpointError` naming the file/tensor."""
    from glmc.export.hf import check_finite, open_checkpoint
    from glmc.export.torch import build_model

    p = Path(path)
    spec = ModelSpec.from_file(p / GLMC_SPEC_FILE)
    f = p / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{p}: torch artifact has no model.safetensors")
    from safetensors import safe_open

    from glmc.export.torch.target import PIPELINE_KEY

    # The framing is validated first (CheckpointError naming the file), then the header's
    # metadata says which passes the tensors follow (fused, FP8).
    with open_checkpoint(f), safe_open(str(f), "pt") as header:
        pipeline = (header.metadata() or {}).get(PIPELINE_KEY) or None
    with torch.device("meta"):
        graph = compile_graph(spec, pipeline, dtype=ir_dtype(dtype))
        model = build_model(graph, dtype=dtype, device="meta")
    want = model.state_dict()
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
    model.load_state_dict(state, strict=True, assign=True)
    model.spec = spec  # type: ignore[assignment]
    return model.eval()
