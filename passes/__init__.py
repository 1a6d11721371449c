"""Passes over the IR: one pass per file, file name == pass name (`fuse_moe.py` <-> `fuse-moe`).

Every pass is a pure `Graph -> Graph` function object; the pipeline (glmc.pipeline) verifies the
graph after each one. Imports only glmc.ir. Files starting with `_` are helpers of a pass."""

from __future__ import annotations

from .base import Pass, PassError
from .fuse_moe import FuseMoE
from .quantize_fp8 import QuantizeFP8
from .shard import Shard


def registry() -> dict[str, type[Pass]]:
    """Every known pass by its pipeline name. Passes register by being listed here."""
    passes: list[type[Pass]] = [FuseMoE, Shard, QuantizeFP8]
    return {p.name: p for p in passes}


__all__ = ["FuseMoE", "Pass", "PassError", "QuantizeFP8", "Shard", "registry"]
