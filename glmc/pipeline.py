"""Pipelines are data: parsed from text such as `fuse-moe,shard{ep=8,tp=2}` into pass objects,
checked for unknown names, bad arguments and bad orders, then run with verification after each.

Ordering rules (each pass's `after`; checked only when both passes are present):
- shard after fuse-moe: tensor parallelism splits fused q/k/v and gate/up per component, and
  needs the components that fuse-moe records;
- quantize-fp8 after fuse-moe and shard: scales are computed per fused component and are split
  with their weights, which needs the final placement to check block alignment.
A pass may appear once.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from glmc.errors import GlmcError
from glmc.ir import Graph, verify
from glmc.passes import Pass, registry
from glmc.untrusted import clip, has_control_chars

if TYPE_CHECKING:
    from glmc.spec import ModelSpec

_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")
# Integer arguments are plain decimal: no `1_000`, no other scripts' digits, no sign but `-`,
# and short enough that no conversion or later arithmetic can run away.
_INT = re.compile(r"-?[0-9]{1,18}")


class PipelineError(GlmcError):
    """A pipeline text that names an unknown pass, passes bad arguments, or orders passes badly."""


@dataclass(frozen=True)
class PassCall:
    name: str
    args: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: for `--time-passes` and provenance."""

    spelling: str
    seconds: float
    verify_seconds: float
    nodes_before: int
    nodes_after: int


def parse(text: str) -> list[PassCall]:
    """`a,b{x=1,y=foo}` -> [PassCall('a', ()), PassCall('b', (('x','1'), ('y','foo')))]."""
    calls: list[PassCall] = []
    pos = 0
    text = text.strip()
    if has_control_chars(text):
        raise PipelineError(f"pipeline {clip(repr(text))} holds control characters")
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(
                f"cannot parse pipeline {clip(repr(text))} at character {pos}: {clip(repr(text[pos:]))}"
            )
        name = clip(m.group(1), 40)
        args: list[tuple[str, str]] = []
        for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise PipelineError(f"pass {name}: argument {clip(repr(part))} is not key=value")
            if key.strip() in (k for k, _ in args):
                raise PipelineError(f"pass {name}: argument {clip(key.strip())} is given twice")
            args.append((key.strip(), value.strip()))
        calls.append(PassCall(m.group(1), tuple(args)))
        pos = m.end()
    return calls


def _convert(pass_name: str, field: str, typ: Any, value: str) -> Any:
    """The pipeline text `value` as the pass field's declared type."""
    if typing.get_origin(typ) is Literal:
        choices = typing.get_args(typ)
        for c in choices:
            if value == str(c):
                return c
        raise PipelineError(
            f"pass {pass_name}: argument {field}={clip(repr(value))} is not one of "
            f"{', '.join(map(str, choices))}"
        )
    bad = PipelineError(
        f"pass {pass_name}: argument {field}={clip(repr(value))} is not a valid {typ.__name__}"
    )
    if typ is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise bad
        return value.lower() in ("true", "1")
    if typ is int:
        if not _INT.fullmatch(value):
            raise bad
        return int(value)
    if typ is float:
        try:
            x = float(value)
        except ValueError:
            raise bad from None
        if not math.isfinite(x) or len(value) > 40:
            raise bad
        return x
    return value


def build(text: str) -> list[Pass]:
    known = registry()
    passes: list[Pass] = []
    for call in parse(text):
        cls = known.get(call.name)
        if cls is None:
            names = ", ".join(sorted(known)) or "none are registered yet"
            raise PipelineError(f"unknown pass {clip(repr(call.name))} in pipeline; known passes: {names}")
        if any(p.name == call.name for p in passes):
            raise PipelineError(f"pass {call.name} appears twice in the pipeline")
        fields = {f.name for f in dataclasses.fields(cls)}
        types = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in call.args:
            if key not in fields:
                raise PipelineError(
                    f"pass {call.name} has no argument {clip(repr(key))}; it takes: "
                    f"{', '.join(sorted(fields)) or 'none'}"
                )
            kwargs[key] = _convert(call.name, key, types[key], value)
        try:
            passes.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise PipelineError(f"pass {call.name}: {e}") from None
    seen: list[str] = []
    for p in passes:
        for earlier in p.after:
            if earlier in (q.name for q in passes) and earlier not in seen:
                raise PipelineError(f"pass {p.name} must come after {earlier} in the pipeline")
        seen.append(p.name)
    return passes


Observer = Callable[[Pass, Graph, PassRecord], None]


def run_passes(graph: Graph, passes: list[Pass], observer: Observer | None = None) -> Graph:
    """Apply `passes` in order, verifying after each; the graph records them in attr `passes`."""
    for p in passes:
        t0 = time.perf_counter()
        out = p.apply(graph)
        t1 = time.perf_counter()
        out = verify(out.with_attrs(passes=(*graph.attrs.passes, p.spelling())))
        t2 = time.perf_counter()
        if observer is not None:
            observer(p, out, PassRecord(p.spelling(), t1 - t0, t2 - t1, len(graph.nodes), len(out.nodes)))
        graph = out
    return graph


def run_pipeline(graph: Graph, text: str, observer: Observer | None = None) -> Graph:
    return run_passes(graph, build(text), observer)


def compile_graph(
    spec: ModelSpec, pipeline: str | None = None, dtype: str = "bf16", observer: Observer | None = None
) -> Graph:
    """The one place a spec is lowered: spec -> IR -> the pipeline's passes, verified after each.
    Everything downstream (targets, loaders, the trainer, the memory guard) receives a graph made
    here, so a model is never rebuilt from a second, possibly different lowering. The pipeline
    text is parsed before lowering: a bad pipeline fails without the work."""
    from glmc.lower import lower

    passes = build(pipeline) if pipeline else []
    return run_passes(lower(spec, dtype=dtype), passes, observer)


def fp8_report(graph: Graph) -> str | None:
    """One line saying what quantize-fp8 did when it kept GEMM weights in high precision (the
    serving stacks' 128 rule), so a user who asked for FP8 is told instead of finding BF16 files;
    None when the pass did not run or quantised every candidate."""
    recipe = graph.attrs.quantization
    kept = graph.attrs.fp8_kept
    if recipe is None or not kept:
        return None
    fp8 = sum(1 for _, _, p in graph.params() if p.attrs.quant is not None and p.attrs.of is None)
    first = next(p.attrs.fp8_kept for _, _, p in graph.params() if p.attrs.fp8_kept)
    what = "no weight" if fp8 == 0 else f"{fp8} weight(s)"
    return (
        f"quantize-fp8 ({recipe}) quantised {what}; {len(kept)} kept high precision for the serving "
        f"stacks' 128 rule (e.g. {kept[0]}: {first}); quantize-fp8{{serving=false}} quantises them for "
        "glmc and transformers, quantize-fp8{strict=true} refuses them"
    )
