"""The shard pass is the training plan: for `shard{dp=2,ep=2}` (4 ranks), `shard{ep=2,tp=2}`
(4 ranks: TP together with EP, experts split over both) and `shard{tp=2}` (2 ranks: routed
experts and vocabulary split over tp as the pass says), 20 steps train what one process trains
(`_dist.assert_same_run`: losses, grad norms, every gradient and weight, final weights), and
every rank holds exactly the parameter and optimizer bytes `glmc inspect --train` predicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ._dist import Probe, Run, assert_same_run, bytes_worker, probed_train, spawn
from .conftest import STDLIB_JSON, tiny_config

STEPS = 20
PLANS = [("shard{dp=2,ep=2}", 4), ("shard{ep=2,tp=2}", 4), ("shard{tp=2}", 2)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = probed_train(tiny_config(tmp_path_factory.mktemp("single"), STDLIB_JSON, steps=STEPS))
    assert run.losses[-1] < run.losses[0] - 1.0  # it learns: the runs compared are not constants
    return run


def inspect_train(pipeline: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`glmc inspect glm-tiny --pipeline P --json --train`, through the CLI."""
    from glmc.cli import main

    capsys.readouterr()
    assert main(["inspect", "glm-tiny", "--pipeline", pipeline, "--json", "--train"]) == 0
    return json.loads(capsys.readouterr().out)["parallel"]


@pytest.mark.slow
@pytest.mark.parametrize(("pipeline", "world"), PLANS, ids=[p for p, _ in PLANS])
def test_shard_plan_trains_what_one_process_trains_and_holds_what_inspect_says(
    tmp_path: Path, reference: Run, capsys: pytest.CaptureFixture[str], pipeline: str, world: int
) -> None:
    predicted = inspect_train(pipeline, capsys)
    cfg = tiny_config(tmp_path, STDLIB_JSON, steps=STEPS, pipeline=pipeline)
    results = spawn(bytes_worker, world, cfg, Probe)
    worst = assert_same_run(results, reference, world)
    print(f"{pipeline} on {world} ranks: largest relative differences {worst}")
    want = {k: predicted["per_rank"][k] for k in ("param_bytes", "optimizer_bytes")}
    for rank, (_, held, _) in results.items():
        assert held == want, f"rank {rank} holds {held}, glmc inspect --train says {want}"
    print(f"{pipeline}: every rank holds {want}")


def test_inspect_train_states_glmc_trains_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    a = inspect_train("shard{ep=2,tp=2}", capsys)["assumptions"]
    assert a["params"] == "f32" and a["master"] == "none" and a["fsdp"] is True
    assert "Muon" in a["optimizer"] and "AdamW" in a["optimizer"]


def test_a_plan_the_launch_does_not_match_exits_2_before_the_model(tmp_path, capsys, monkeypatch):
    """Refused by the pass, naming the degrees, before any model exists."""
    import glmc.train.trainer as trainer
    from glmc.cli import main

    def no_model(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was built")

    monkeypatch.setattr(trainer, "build_torch", no_model)
    base = ["train", "glm-tiny", "--data", str(STDLIB_JSON), "-o", str(tmp_path / "r"), "--no-compile"]
    for extra, message in (
        (
            ["--pipeline", "shard{ep=2,tp=2}"],
            "pp x dp x ep x tp = 1 x 1 x 2 x 2 needs 4 processes but the launch has 1",
        ),
        (["--tp", "3"], "shard: tp=3 does not divide attention.num_heads=4"),
        (["--ep", "3"], "shard: ep=3 does not divide moe.num_experts=8"),
        (["--pipeline", "shard{ep=2}", "--tp", "2"], "--tp 2 disagree with the pipeline's shard pass"),
        (["--pipeline", "quantize-fp8"], "training FP8 weights is not supported"),
        (["--pipeline", "shard{tp=4}"], "the shard pass replicates KV heads over tp"),
    ):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in " ".join(err.split()), (extra, err)
        assert "Traceback" not in err
