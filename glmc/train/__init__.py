"""Training the emitted model: `glmc.train.train(TrainConfig(...))` or `glmc train SPEC --data PATH`.

See glmc/train/README.md for the recipe, the parallel plan and the choices made where the public
training stacks differ."""

from glmc.train.config import TrainConfig
from glmc.train.plan import ParallelPlan
from glmc.train.trainer import TrainResult, train

__all__ = ["ParallelPlan", "TrainConfig", "TrainResult", "train"]
