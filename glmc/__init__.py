"""glmc: a compiler for GLM-4.5-class Mixture-of-Experts language models.

Light to import: torch-dependent entry points load on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from glmc import presets
from glmc.errors import CheckpointError, GlmcError, SpecError
from glmc.spec import ModelSpec
from glmc.version import __version__ as __version__

if TYPE_CHECKING:
    from glmc.api import build, from_pretrained, inspect, save_pretrained

__all__ = [
    "CheckpointError",
    "GlmcError",
    "ModelSpec",
    "SpecError",
    "build",
    "from_pretrained",
    "inspect",
    "presets",
    "save_pretrained",
]

_LAZY = {"build", "from_pretrained", "inspect", "save_pretrained"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from glmc import api

        return getattr(api, name)
    raise AttributeError(f"module 'glmc' has no attribute {name!r}")
