"""Passes over the IR: one pass per file, file name == pass name (`fuse_moe.py` <-> `fuse-moe`).

Every pass is a pure `Graph -> Graph` function object; the pipeline (glmc.pipeline) verifies the
graph after each one. Imports only glmc.ir."""

from __future__ import annotations

from .base import Pass


def registry() -> dict[str, type[Pass]]:
    """Every known pass by its pipeline name. Passes register by being listed here."""
    passes: list[type[Pass]] = []
    return {p.name: p for p in passes}


__all__ = ["Pass", "registry"]
