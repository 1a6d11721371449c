"""Training the emitted model: `glmc.train.train(TrainConfig(...))` or `glmc train SPEC --data PATH`.

See glmc/train/README.md for the recipe, the parallel plan and the choices made where the public
training stacks differ.

`glmc.train.config` imports no torch, so the CLI can build `glmc train`'s options (from the
config's defaults) without loading torch for every other verb; the rest loads on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from glmc.train.config import TrainConfig

if TYPE_CHECKING:
    from glmc.train.plan import ParallelPlan
    from glmc.train.trainer import TrainResult, train

__all__ = ["ParallelPlan", "TrainConfig", "TrainResult", "train"]

_LAZY = {
    "ParallelPlan": "glmc.train.plan",
    "TrainResult": "glmc.train.trainer",
    "train": "glmc.train.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glmc.train' has no attribute {name!r}")
