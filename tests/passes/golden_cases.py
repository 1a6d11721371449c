"""The per-pass golden cases: name -> (spec, pipeline). `regen_golden.py` writes
`golden/<name>.ir`; `test_pass_goldens.py` compares. The file name starts with the pass under test."""

from __future__ import annotations

from specs import WIDE  # tests/specs.py

from glmc import presets
from glmc.ir import Graph, format_graph
from glmc.lower import lower
from glmc.pipeline import run_pipeline
from glmc.spec import ModelSpec

CASES: dict[str, tuple[str, str]] = {
    "fuse-moe": ("glm-tiny", "fuse-moe"),
    "shard.ep2-tp2-pp2": ("glm-tiny", "fuse-moe,shard{ep=2,tp=2,pp=2}"),
    "shard.unfused-ep4-tp4": ("glm-tiny", "shard{ep=4,tp=4}"),
    "shard.redundant": ("glm-tiny", "fuse-moe,shard{ep=4,redundant_experts=4}"),
    "quantize-fp8.block128": ("glm-tiny", "fuse-moe,quantize-fp8"),
    "quantize-fp8.channel-unfused": ("glm-tiny", "quantize-fp8{recipe=channel,exclude=*.shared_experts.*}"),
    "quantize-fp8.block128-tp2": ("wide", "fuse-moe,shard{tp=2,ep=2},quantize-fp8"),
}


def spec(name: str) -> ModelSpec:
    return ModelSpec.from_dict(WIDE) if name == "wide" else presets.get(name)


def graph(case: str) -> Graph:
    spec_name, pipeline = CASES[case]
    return run_pipeline(lower(spec(spec_name)), pipeline)


def text(case: str) -> str:
    return format_graph(graph(case))
