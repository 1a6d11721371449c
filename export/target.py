"""The Target seam: what every artifact writer (`--emit NAME`) is, and the one registry of them.

A target receives the graph the pipeline produced (`glmc.pipeline.compile_graph`: lowered once,
passes run once) and either honours every pass that ran or refuses it in `check`, naming the
target, the pass and a node it changed, before any output folder exists or any weight is made.
Spec-dependent facts travel as plain data (`Meta`): export/ imports only glmc.ir and
glmc.kernels, never the pydantic spec.

Targets load lazily: the registry names a module per target, imported on first use, so listing
the names (the CLI's help) imports neither torch nor a target's optional dependencies.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from glmc.ir import GlmcError, Graph, Op, ParamAttrs

from .sidecar import Sidecar

if TYPE_CHECKING:
    import torch

GLMC_SPEC_FILE = "glmc_spec.json"  # marks a folder written by glmc; holds the ModelSpec as JSON
RUNTIME_FILE = "glmc_runtime.json"  # a runnable non-checkpoint artifact: target, files, spec

# name -> (module, class), in the order `--emit` and the docs list them.
_REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("glmc.export.torch.target", "TorchTarget"),
    "hf": ("glmc.export.hf.target", "HfTarget"),
    "trtllm": ("glmc.export.trtllm.target", "TrtllmTarget"),
    "onnx": ("glmc.export.onnx.target", "OnnxTarget"),
    "aoti": ("glmc.export.aoti.target", "AotiTarget"),
    "torch-trt": ("glmc.export.torch_trt.target", "TorchTrtTarget"),
}


@dataclass(frozen=True)
class Meta:
    """What a target needs from the spec and the driver, as plain data."""

    name: str
    spec: Mapping[str, Any]  # the ModelSpec as JSON: written beside artifacts that run alone
    hf_config: Mapping[str, Any]  # the Hugging Face config.json (glm4_moe) of the model
    eos_token_id: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    think_ids: tuple[int, int] | None  # <think>, </think> when the vocabulary is GLM-4.5's
    glmc_version: str
    source: str = "glmc build"  # provenance written into manifests
    # The source checkpoint's tokenizer, chat template and generation files (export.sidecar),
    # checked before any work; checkpoint-layout targets carry them, onnx its tokenizer.
    sidecars: tuple[Sidecar, ...] = ()


@dataclass(frozen=True)
class Weights:
    """Tensors by name and the graph whose parameters they are (names, shapes, dtypes)."""

    graph: Graph
    state: Mapping[str, torch.Tensor]

    def module(self, dtype: torch.dtype) -> torch.nn.Module:
        """The torch model of `graph` holding these weights, cast to `dtype`, in eval mode."""
        from glmc.export.torch import build_model

        model = build_model(self.graph, dtype=dtype)
        model.load_state_dict(dict(self.state), strict=True)
        return model.eval()


class Target(Protocol):
    name: str
    honours: frozenset[str]  # pipeline pass names whose effect this target's artifact keeps

    def check(self, graph: Graph) -> None:
        """Raise GlmcError (one line: target, pass, node) for anything the target cannot honour."""
        ...

    def emit(self, graph: Graph, weights: Weights, out: Path, meta: Meta) -> None:
        """Write the artifact into the new folder `out` (its parent exists, `out` does not)."""
        ...

    def size_hint(self, graph: Graph, itemsize: int) -> int:
        """A lower bound on the bytes `emit` writes (0 when it depends on an exporter)."""
        ...


class BaseTarget:
    """Defaults: refuse every pass not in `honours`; no size estimate."""

    name: ClassVar[str] = ""
    honours: ClassVar[frozenset[str]] = frozenset()
    # Why a pass is not honoured, by pass name, for the refusal's message.
    why_not: ClassVar[Mapping[str, str]] = {}

    def check(self, graph: Graph) -> None:
        refuse_unhonoured(self.name, self.honours, graph, self.why_not)

    def size_hint(self, graph: Graph, itemsize: int) -> int:
        return 0


def pass_names(graph: Graph) -> list[tuple[str, str]]:
    """(name, spelling) of each pass that ran, e.g. ('shard', 'shard{ep=8}')."""
    return [(str(s).partition("{")[0], str(s)) for s in graph.attrs.passes]


def refuse_unhonoured(
    target: str, honours: frozenset[str], graph: Graph, why_not: Mapping[str, str] | None = None
) -> None:
    for name, spelling in pass_names(graph):
        if name not in honours:
            others = [t for t in names() if t != target and name in get(t).honours]
            instead = f", or emit {', '.join(others[:-1])} or {others[-1]}" if len(others) > 1 else ""
            why = (why_not or {}).get(name, f"the {target} artifact would be written without it")
            raise GlmcError(
                f"{target}: {spelling} ({changed_node(graph, name)}) is not supported: {why}; "
                f"drop it from --pipeline{instead}"
            )


# The parameter attributes each pass sets, to name the first node a refused pass changed.
_MARKS: dict[str, tuple[Callable[[ParamAttrs], bool], ...]] = {
    "fuse-moe": (lambda a: bool(a.fused),),
    "quantize-fp8": (lambda a: a.quant is not None, lambda a: a.fp8_kept is not None),
    "shard": (lambda a: bool(a.shard),),
}
_COLLECTIVES = (Op.ALL_REDUCE, Op.ALL_GATHER, Op.ALL_TO_ALL, Op.SEND_RECV)


def changed_node(graph: Graph, pass_name: str) -> str:
    """'node NAME' of the first node `pass_name` changed, in words ('the graph' when none shows)."""
    for marked in _MARKS.get(pass_name, ()):
        for _full, node, p in graph.params():
            if marked(p.attrs):
                return f"node {node.name}, parameter {p.name}"
    if pass_name == "shard":
        for n in graph.nodes:
            if n.op in _COLLECTIVES or n.attrs.stage is not None:
                return f"node {n.name}"
    return "the graph"


def names() -> tuple[str, ...]:
    """Every target name, without importing any target."""
    return tuple(_REGISTRY)


def get(name: str) -> Target:
    """The target `name`; GlmcError listing the known ones for any other name."""
    if name not in _REGISTRY:
        raise GlmcError(f"unknown target {name!r} in --emit; known targets: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name]
    target: Target = getattr(importlib.import_module(module), cls)()
    return target


def targets() -> dict[str, Target]:
    """Every registered target by name (imports each target's light module)."""
    return {n: get(n) for n in _REGISTRY}


def write_runtime_manifest(
    out: Path, target: str, meta: Meta, files: Mapping[str, str], **extra: Any
) -> None:
    """`glmc_runtime.json`: what `glmc generate` needs to run a folder without the build."""
    data = {"target": target, "files": dict(files), "spec": dict(meta.spec), **extra}
    (out / RUNTIME_FILE).write_text(json.dumps(data, indent=2) + "\n")
