"""Pipelines are data: parsed from text such as `fuse-moe,shard{ep=8,tp=2}` into pass objects,
checked for unknown names, bad arguments and bad orders, then run with verification after each."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from glmc.errors import GlmcError
from glmc.ir import Graph, verify
from glmc.passes import Pass, registry

_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


class PipelineError(GlmcError):
    """A pipeline text that names an unknown pass, passes bad arguments, or orders passes badly."""


@dataclass(frozen=True)
class PassCall:
    name: str
    args: tuple[tuple[str, str], ...]


def parse(text: str) -> list[PassCall]:
    """`a,b{x=1,y=foo}` -> [PassCall('a', ()), PassCall('b', (('x','1'), ('y','foo')))]."""
    calls: list[PassCall] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"cannot parse pipeline {text!r} at character {pos}: {text[pos:]!r}")
        args: list[tuple[str, str]] = []
        for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise PipelineError(f"pass {m.group(1)}: argument {part!r} is not key=value")
            args.append((key.strip(), value.strip()))
        calls.append(PassCall(m.group(1), tuple(args)))
        pos = m.end()
    return calls


def _convert(pass_name: str, field: dataclasses.Field[Any], value: str) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
    except ValueError:
        raise PipelineError(
            f"pass {pass_name}: argument {field.name}={value!r} is not a valid {kind}"
        ) from None
    return value


def build(text: str) -> list[Pass]:
    known = registry()
    passes: list[Pass] = []
    for call in parse(text):
        cls = known.get(call.name)
        if cls is None:
            names = ", ".join(sorted(known)) or "none are registered yet"
            raise PipelineError(f"unknown pass {call.name!r} in pipeline; known passes: {names}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in call.args:
            if key not in fields:
                raise PipelineError(
                    f"pass {call.name} has no argument {key!r}; it takes: {', '.join(fields) or 'none'}"
                )
            kwargs[key] = _convert(call.name, fields[key], value)
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


def run_pipeline(graph: Graph, text: str) -> Graph:
    for p in build(text):
        graph = verify(p.apply(graph))
    return graph
