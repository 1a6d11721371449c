"""The per-pass golden cases: name -> (spec, pipeline). `regen_golden.py` writes
`golden/<name>.ir`; `test_pass_goldens.py` compares. The file name starts with the pass under test."""

from __future__ import annotations

from glmc import presets
from glmc.ir import Graph, format_graph
from glmc.lower import lower
from glmc.pipeline import run_pipeline
from glmc.spec import ModelSpec

# A GLM-shaped spec whose GEMM dims are multiples of 128, so block128 can follow tp=2 splits.
WIDE = {
    "name": "glm-wide",
    "vocab_size": 256,
    "hidden_size": 256,
    "num_layers": 3,
    "num_dense_layers": 1,
    "attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 128, "qk_norm": True, "qkv_bias": True},
    "mlp": {"intermediate_size": 256},
    "moe": {"num_experts": 4, "top_k": 2, "intermediate_size": 256, "routed_scaling_factor": 2.5},
    "num_mtp_layers": 1,
    "max_position_embeddings": 4096,
}

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
