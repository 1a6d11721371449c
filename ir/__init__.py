"""glmc's intermediate representation: a small, frozen, printable graph of a GLM-4.5-class model.

Standard library only: no torch, no pydantic (a layering test enforces this)."""

from .analysis import (
    ParamCounts,
    count_params,
    flops_per_token,
    kv_cache_bytes_per_token,
    node_flops,
    summary,
    weight_bytes,
)
from .dtypes import DType
from .errors import CheckpointError, GlmcError, SpecError
from .graph import Graph, Node, Param, ParamRole, make_attrs
from .memory import TrainingAssumptions, per_rank_memory
from .ops import Op
from .placement import (
    MESH_AXES,
    ShardSpec,
    local_shape,
    max_local_numel,
    mesh_of,
    shard_specs,
    stage_of,
    with_shards,
)
from .printer import format_graph, format_node
from .rewrite import rewrite
from .verify import VerifyError, verify

__all__ = [
    "MESH_AXES",
    "CheckpointError",
    "DType",
    "GlmcError",
    "Graph",
    "Node",
    "Op",
    "Param",
    "ParamCounts",
    "ParamRole",
    "ShardSpec",
    "SpecError",
    "TrainingAssumptions",
    "VerifyError",
    "count_params",
    "flops_per_token",
    "format_graph",
    "format_node",
    "kv_cache_bytes_per_token",
    "local_shape",
    "make_attrs",
    "max_local_numel",
    "mesh_of",
    "node_flops",
    "per_rank_memory",
    "rewrite",
    "shard_specs",
    "stage_of",
    "summary",
    "verify",
    "weight_bytes",
    "with_shards",
]
