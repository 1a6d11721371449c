"""The Python API: resolve a spec, inspect it, build artifacts, load and save checkpoints."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from glmc import presets
from glmc.errors import CheckpointError, GlmcError, SpecError
from glmc.ir import Graph, TrainingAssumptions, format_graph, per_rank_memory, summary
from glmc.lower import lower
from glmc.outdir import atomic_folder, check_output_folder
from glmc.resources import check_model
from glmc.spec import ModelSpec

GLMC_SPEC_FILE = "glmc_spec.json"  # marks a folder written by glmc; holds the ModelSpec
TARGETS = ("torch", "hf", "trtllm", "onnx", "aoti", "torch-trt")
DEFAULT_TARGETS = ("torch", "hf")  # the deployment targets take minutes; ask for them by name


def resolve_spec(spec: ModelSpec | str | Path | dict[str, Any]) -> ModelSpec:
    """A ModelSpec from a spec object, a dict, a preset name, a YAML/JSON spec file, a Hugging
    Face config.json, or a checkpoint folder (glmc's or Hugging Face's)."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, dict):
        return ModelSpec.from_hf_config(spec) if "model_type" in spec else ModelSpec.from_dict(spec)
    text = str(spec)
    if text in presets.names():
        return presets.get(text)
    p = Path(text)
    if p.is_dir():
        if (p / GLMC_SPEC_FILE).is_file():
            return ModelSpec.from_file(p / GLMC_SPEC_FILE)
        if (p / "config.json").is_file():
            return ModelSpec.from_hf_config(p)
        raise SpecError(f"{p}: folder has neither {GLMC_SPEC_FILE} nor config.json")
    if p.is_file():
        return ModelSpec.from_file(p)
    raise SpecError(
        f"{text!r} is not a preset ({', '.join(presets.names())}), a spec file or a checkpoint folder"
    )


def trunk_only_without_mtp(spec: ModelSpec, names: Iterable[str], where: Path, action: str) -> ModelSpec:
    """`spec` without MTP layers when checkpoint `names` hold none of them (transformers never
    saves MTP weights, so such a checkpoint is the trunk alone); warns when it drops them."""
    prefix = f"model.layers.{spec.num_layers}."
    if spec.num_mtp_layers and not any(k.startswith(prefix) for k in names):
        warnings.warn(
            f"{where}: config.json declares {spec.num_mtp_layers} MTP layer(s) but the checkpoint has no "
            f"{prefix}* tensors; {action} without MTP layers",
            stacklevel=3,
        )
        return spec.model_copy(update={"num_mtp_layers": 0})
    return spec


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


def compile_graph(spec: ModelSpec, pipeline: str | None = None, dtype: str = "bf16") -> Graph:
    g = lower(spec, dtype=dtype)
    if pipeline:
        from glmc.pipeline import run_pipeline

        g = run_pipeline(g, pipeline)
    return g


# ---- torch models ---------------------------------------------------------------------------


def build_torch(spec: ModelSpec, dtype: torch.dtype = torch.float32, seed: int | None = 0) -> torch.nn.Module:
    """A randomly initialised torch model of `spec` (transformers' init, deterministic per seed)."""
    from glmc.export.torch import build_model

    model = build_model(lower(spec), dtype=dtype)
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
    from glmc.convert import CONVERT_FILE, open_source
    from glmc.export.hf import TensorReader, from_hf, open_checkpoint, recipe_of
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
    graph = lower(spec, dtype=_ir_dtype(dtype))
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
    spec: ModelSpec | None = getattr(model, "spec", None)
    if spec is None:
        raise GlmcError(
            "save_pretrained needs a glmc model (one with a .spec), e.g. from glmc.from_pretrained"
        )
    state = model.state_dict()
    graph = lower(spec, dtype=_ir_dtype(next(iter(state.values())).dtype))
    with atomic_folder(path, replace=True) as tmp:
        write_hf_folder(spec, graph, state, tmp, max_shard_bytes)
    return Path(path)


def write_hf_folder(
    spec: ModelSpec, graph: Graph, state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = 5 * 2**30
) -> None:
    from glmc.export.hf import to_hf, write_checkpoint

    write_checkpoint(to_hf(graph, state), out, max_shard_bytes=max_shard_bytes)
    cfg = spec.to_hf_config()
    cfg["torch_dtype"] = _dtype_name(next(iter(state.values())).dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dt = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "f32": torch.float32, "float32": torch.float32,
          "fp32": torch.float32, "f16": torch.float16, "float16": torch.float16}.get(name)  # fmt: skip
    if dt is None:
        raise GlmcError(f"unsupported dtype {name!r}; use bf16, f16 or f32")
    return dt


def _ir_dtype(dt: torch.dtype) -> str:
    """The IR dtype name of a torch floating dtype (the graph's storage dtype)."""
    return _dtype_name(dt)


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

    Without `weights` the model is randomly initialised (deterministic per `seed`); with a
    Hugging Face checkpoint folder its weights are loaded and checked against the spec, and
    refused if any holds NaN or Inf unless `allow_nonfinite`. `out` is checked before any work
    (`glmc.outdir.check_output_folder`: never the current folder or one above it, never a
    folder that is, holds or lies inside an input) and written atomically."""
    say = progress or (lambda _msg: None)
    unknown = [t for t in emit if t not in TARGETS]
    if unknown:
        raise GlmcError(
            f"unknown target(s) {', '.join(unknown)} in --emit; known targets: {', '.join(TARGETS)}"
        )
    if not emit:
        raise GlmcError("--emit names no target")
    if trtllm_version is not None and "trtllm" not in emit:
        raise GlmcError("--trtllm-version applies to --emit trtllm")
    s = resolve_spec(spec)
    out = Path(out)
    inputs = {"--weights folder": weights, "spec": _spec_path(spec)}
    check_output_folder(out, inputs=inputs, replace=force)  # before any work
    torch_dtype = _torch_dtype(dtype)
    check_model(s, _ir_dtype(torch_dtype), "glmc build", weights)  # refuse what cannot fit, before allocating
    say(f"lowering {s.name}")
    graph = compile_graph(s, pipeline, dtype=_ir_dtype(torch_dtype))
    manifest: dict[str, Any] = {
        "glmc_version": _version(),
        "spec": s.model_dump(mode="json"),
        "pipeline": pipeline or "",
        "weights": str(weights) if weights else f"random(seed={seed})",
        "targets": list(emit),
        "summary": summary(graph),
    }
    need = _build_bytes(manifest["summary"], graph, emit, torch_dtype)
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
            model = build_torch(s, dtype=torch_dtype, seed=seed)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if weights is None and not allow_nonfinite:
            from glmc.export.hf import check_finite

            for k, v in state.items():  # a random init is finite unless the spec's sizes overflow
                check_finite(v, k, "the randomly initialised model")
        (tmp / "graph.txt").write_text(format_graph(graph))
        for target in emit:
            say(f"emitting {target}")
            if target == "trtllm" and trtllm_version is not None:
                from glmc.runtime.emit import emit_trtllm  # the options' TensorRT-LLM release

                emit_trtllm(s, graph, state, tmp / target, trtllm_version=trtllm_version)
            else:
                _EMITTERS[target](s, graph, state, tmp / target)
        (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _spec_path(spec: object) -> Path | None:
    """The file or folder a spec argument names (None for a preset name or an object)."""
    if not isinstance(spec, str | Path) or str(spec) in presets.names():
        return None
    p = Path(spec)
    return p if p.exists() else None


def _build_bytes(info: dict[str, Any], graph: Graph, emit: Sequence[str], dtype: torch.dtype) -> int:
    """A lower bound on what the checkpoint targets write (the deployment targets' sizes
    depend on their exporters and are not counted): compared with the free space up front."""
    params = int(info["params"]["checkpoint"])  # the Hugging Face layout writes the MTP copies
    held = int(info["params"]["in_memory"])  # the torch artifact does not
    item = torch.empty(0, dtype=dtype).element_size()
    fp8 = graph.attr("quantization", None) is not None
    per_target = {"torch": held * item, "hf": params * (1 if fp8 else item), "trtllm": params}
    return sum(per_target.get(t, 0) for t in emit)


def _emit_torch(spec: ModelSpec, graph: Graph, state: dict[str, torch.Tensor], out: Path) -> None:
    """glmc's own layout: stacked experts under the torch module's names, plus the spec."""
    from glmc.export.hf import write_safetensors

    out.mkdir(parents=True)
    write_safetensors(out / "model.safetensors", state, metadata={"format": "pt"})
    (out / GLMC_SPEC_FILE).write_text(json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")
    (out / "graph.txt").write_text(format_graph(graph))


def _emit_hf(spec: ModelSpec, graph: Graph, state: dict[str, torch.Tensor], out: Path) -> None:
    out.mkdir(parents=True)
    if not any(graph.attr(k, None) is not None for k in ("weight_layout", "quantization", "mesh")):
        write_hf_folder(spec, graph, state, out)
        return
    # The pipeline changes the checkpoint (fused, FP8 or per-rank): write it the way
    # `glmc convert` does, from the Hugging Face tensors of the unpassed model.
    from glmc.convert import CONVERT_FILE, _manifest, write_config, write_layout
    from glmc.export.hf import DictCheckpoint, LogicalSource, plan_checkpoint, to_hf

    plain = lower(spec, dtype=str(graph.attr("dtype")))
    tensors = LogicalSource(DictCheckpoint(dict(to_hf(plain, state))), plan_checkpoint(plain), None)
    write_layout(graph, tensors, out)
    write_config(spec, graph, out)
    manifest = _manifest(graph, ",".join(graph.attr("passes", ())), "glmc build")
    (out / CONVERT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _deploy_emitter(target: str) -> Callable[[ModelSpec, Graph, dict[str, torch.Tensor], Path], None]:
    """Deployment targets (glmc.runtime.emit) load their optional dependencies on first use."""

    def emit(spec: ModelSpec, graph: Graph, state: dict[str, torch.Tensor], out: Path) -> None:
        from glmc.runtime import emit as deploy

        getattr(deploy, "emit_" + target.replace("-", "_"))(spec, graph, state, out)

    return emit


_EMITTERS: dict[str, Callable[[ModelSpec, Graph, dict[str, torch.Tensor], Path], None]] = {
    "torch": _emit_torch,
    "hf": _emit_hf,
    **{t: _deploy_emitter(t) for t in ("trtllm", "onnx", "aoti", "torch-trt")},
}


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
    with torch.device("meta"):
        model = build_model(lower(spec), dtype=dtype, device="meta")
    want = model.state_dict()
    with open_checkpoint(f) as reader:  # validates the file's framing: CheckpointError naming it
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
            if not allow_nonfinite:
                check_finite(state[k], k, str(f))
    model.load_state_dict(state, strict=True, assign=True)
    model.spec = spec  # type: ignore[assignment]
    return model.eval()


def _version() -> str:
    from glmc import __version__

    return __version__
