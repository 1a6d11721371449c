"""The Python API: resolve a spec, inspect it, build artifacts, load and save checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from glmc import presets
from glmc.errors import CheckpointError, GlmcError, SpecError
from glmc.ir import Graph, TrainingAssumptions, format_graph, per_rank_memory, summary
from glmc.lower import lower
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


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a Hugging Face layout folder (single or sharded safetensors, per-expert names, MTP
    at layer index num_hidden_layers) or a folder written by glmc (its torch artifact, or any
    unsharded `glmc convert` output: fused, FP8 block128 or channel, dequantised on the CPU);
    `model.spec` is its spec."""
    from glmc.convert import CONVERT_FILE, open_source
    from glmc.export.hf import TensorReader, from_hf, open_checkpoint, recipe_of
    from glmc.export.torch import build_model

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {p}")
    if (p / GLMC_SPEC_FILE).is_file():
        return load_torch_artifact(p, dtype=dtype)
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
        state = from_hf(graph, reader, dtype=dtype)
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
    appears complete or not at all."""
    spec: ModelSpec | None = getattr(model, "spec", None)
    if spec is None:
        raise GlmcError(
            "save_pretrained needs a glmc model (one with a .spec), e.g. from glmc.from_pretrained"
        )
    state = model.state_dict()
    graph = lower(spec, dtype=_ir_dtype(next(iter(state.values())).dtype))
    with atomic_folder(Path(path), replace=True) as tmp:
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
) -> dict[str, Any]:
    """Compile `spec` and write one subfolder per target into `out`, plus `build.json`.

    Without `weights` the model is randomly initialised (deterministic per `seed`); with a
    Hugging Face checkpoint folder its weights are loaded and checked against the spec."""
    say = progress or (lambda _msg: None)
    unknown = [t for t in emit if t not in TARGETS]
    if unknown:
        raise GlmcError(
            f"unknown target(s) {', '.join(unknown)} in --emit; known targets: {', '.join(TARGETS)}"
        )
    if not emit:
        raise GlmcError("--emit names no target")
    s = resolve_spec(spec)
    out = Path(out)
    if out.exists() and not force and any(out.iterdir()):
        raise GlmcError(f"output folder {out} exists and is not empty; pass --force to replace it")
    torch_dtype = _torch_dtype(dtype)
    say(f"lowering {s.name}")
    graph = compile_graph(s, pipeline, dtype=_ir_dtype(torch_dtype))
    if weights is not None:
        say(f"loading weights from {weights}")
        model = from_pretrained(weights, dtype=torch_dtype)
        loaded: ModelSpec = model.spec  # type: ignore[assignment]
        if loaded.model_dump(exclude={"name"}) != s.model_dump(exclude={"name"}):
            raise CheckpointError(
                f"--weights {weights}: its config.json describes a different model than {s.name}"
            )
    else:
        say("initialising random weights")
        model = build_torch(s, dtype=torch_dtype, seed=seed)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    manifest: dict[str, Any] = {
        "glmc_version": _version(),
        "spec": s.model_dump(mode="json"),
        "pipeline": pipeline or "",
        "weights": str(weights) if weights else f"random(seed={seed})",
        "targets": list(emit),
        "summary": summary(graph),
    }
    with atomic_folder(out, replace=force) as tmp:
        (tmp / "graph.txt").write_text(format_graph(graph))
        for target in emit:
            say(f"emitting {target}")
            _EMITTERS[target](s, graph, state, tmp / target)
        (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _emit_torch(spec: ModelSpec, graph: Graph, state: dict[str, torch.Tensor], out: Path) -> None:
    """glmc's own layout: stacked experts under the torch module's names, plus the spec."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
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


def load_torch_artifact(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load the folder the torch target wrote (`glmc build ... --emit torch`)."""
    from safetensors.torch import load_file

    from glmc.export.torch import build_model

    p = Path(path)
    spec = ModelSpec.from_file(p / GLMC_SPEC_FILE)
    model = build_model(lower(spec), dtype=dtype)
    f = p / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{p}: torch artifact has no model.safetensors")
    state = load_file(str(f))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{f}: does not match {GLMC_SPEC_FILE}: {e}") from None
    model.spec = spec  # type: ignore[assignment]
    return model.eval()


@contextmanager
def atomic_folder(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success it becomes `dest`, on failure it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        if dest.exists():
            if not (replace or not any(dest.iterdir())):
                raise GlmcError(f"output folder {dest} exists and is not empty")
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_permissions(root: Path) -> None:
    """mkdtemp and some writers create owner-only files; give the result the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        executable = p.is_dir() or p.stat().st_mode & 0o100  # keep launch scripts runnable
        p.chmod((0o777 if executable else 0o666) & ~umask)


def _version() -> str:
    from glmc import __version__

    return __version__
