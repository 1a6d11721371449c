"""glmc's targets: each `--emit` name is a `Target` in `export/<target>/` (registry:
`targets()`, `names()`, `get(name)`), plus the weight transforms they share (`hf/`).

Light to import: the registry loads a target's module on first use."""

from .target import (
    GLMC_SPEC_FILE,
    RUNTIME_FILE,
    BaseTarget,
    Meta,
    Target,
    Weights,
    get,
    names,
    targets,
)

__all__ = [
    "GLMC_SPEC_FILE",
    "RUNTIME_FILE",
    "BaseTarget",
    "Meta",
    "Target",
    "Weights",
    "get",
    "names",
    "targets",
]
