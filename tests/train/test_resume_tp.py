"""Checkpoints under tensor parallelism resume bit for bit: `shard{tp=2}` (2 ranks: attention,
MLPs, vocabulary and every routed expert's columns split over tp) and `shard{ep=2,tp=2}`
(4 ranks: experts over ep and their columns over tp, which the checkpoint gathers to whole
[E, ...] tensors and slices back on load). Resuming reproduces the uninterrupted run's losses
and its final weights exactly; the same checkpoint read on one process continues within float
noise (its pieces reassembled whatever plan wrote them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmc.train import train

from ._dist import assert_resume_is_exact
from .conftest import STDLIB_JSON, tiny_config

PLANS = [("shard{tp=2}", 2), ("shard{ep=2,tp=2}", 4)]


@pytest.mark.slow
@pytest.mark.parametrize(("pipeline", "world"), PLANS, ids=[p for p, _ in PLANS])
def test_resume_under_tp_is_exact(tmp_path: Path, pipeline: str, world: int) -> None:
    def cfg(name: str, **changes: object) -> object:
        return tiny_config(tmp_path / name, STDLIB_JSON, steps=6, save_every=3, pipeline=pipeline, **changes)

    full = assert_resume_is_exact(cfg, world)
    ckpt = tmp_path / "full" / "checkpoints" / "step-000003"
    # One process reads the tp (and ep) pieces back whole and continues the same run.
    one = train(tiny_config(tmp_path / "one", STDLIB_JSON, steps=6, resume=str(ckpt))).records
    assert [r["step"] for r in one] == [4, 5, 6]
    for x, y in zip([r["loss"] for r in one], full[0][1][3:], strict=True):
        assert abs(x - y) / y < 1e-4, (x, y)
