"""glmc's intermediate representation: a small, frozen, printable graph of a GLM-4.5-class model.

Standard library only: no torch, no pydantic (a layering test enforces this)."""

from .analysis import (
    ParamCounts,
    count_params,
    flops_per_token,
    kv_cache_bytes_per_token,
    summary,
    weight_bytes,
)
from .dtypes import DType
from .errors import CheckpointError, GlmcError, SpecError
from .graph import Graph, Node, Param, ParamRole, make_attrs
from .ops import Op
from .printer import format_graph, format_node
from .rewrite import rewrite
from .verify import VerifyError, verify

__all__ = [
    "CheckpointError",
    "DType",
    "GlmcError",
    "Graph",
    "Node",
    "Op",
    "Param",
    "ParamCounts",
    "ParamRole",
    "SpecError",
    "VerifyError",
    "count_params",
    "flops_per_token",
    "format_graph",
    "format_node",
    "kv_cache_bytes_per_token",
    "make_attrs",
    "rewrite",
    "summary",
    "verify",
    "weight_bytes",
]
