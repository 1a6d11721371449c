"""Checkpoints under tensor parallelism resume bit for bit: `shard{tp=2}` (2 ranks: attention,
MLPs, vocabulary and every routed expert's columns split over tp) and `shard{ep=2,tp=2}`
(4 ranks: experts over ep and their columns over tp, which the checkpoint gathers to whole
[E, ...] tensors and slices back on load). Resuming reproduces the uninterrupted run's losses
and its final weights exactly; the same checkpoint read on one process continues within float
noise (its pieces reassembled whatever plan wrote them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glmc.train import train
from glmc.train.checkpoint import read_model_state

from ._dist import run_distributed
from .conftest import STDLIB_JSON, tiny_config

PLANS = [("shard{tp=2}", 2), ("shard{ep=2,tp=2}", 4)]


@pytest.mark.slow
@pytest.mark.parametrize(("pipeline", "world"), PLANS, ids=[p for p, _ in PLANS])
def test_resume_under_tp_is_exact(tmp_path: Path, pipeline: str, world: int) -> None:
    def cfg(name: str, **changes: object) -> object:
        return tiny_config(tmp_path / name, STDLIB_JSON, steps=6, save_every=3, pipeline=pipeline, **changes)

    full = run_distributed(cfg("full"), world)
    for rank in range(world):
        assert full[rank][0] == "ok", full[rank]
    ckpt = tmp_path / "full" / "checkpoints" / "step-000003"
    resumed = run_distributed(cfg("resumed", resume=str(ckpt)), world)
    for rank in range(world):
        assert resumed[rank][0] == "ok", resumed[rank]
        assert resumed[rank][1] == full[rank][1][3:]  # the uninterrupted run's losses, bit for bit
    a = read_model_state(tmp_path / "full" / "checkpoints" / "step-000006")
    b = read_model_state(tmp_path / "resumed" / "checkpoints" / "step-000006")
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    # One process reads the tp (and ep) pieces back whole and continues the same run.
    one = train(tiny_config(tmp_path / "one", STDLIB_JSON, steps=6, resume=str(ckpt))).records
    assert [r["step"] for r in one] == [4, 5, 6]
    for x, y in zip([r["loss"] for r in one], full[0][1][3:], strict=True):
        assert abs(x - y) / y < 1e-4, (x, y)
