"""`glmc train --dry-run`: every rank role of a plan is built by the trainer's own placement code
on the meta device under a fake process group and stepped on fake tensors; the bytes each role
holds (parameters, gradients, optimizer state, summed over its local pieces) equal the IR's
per-rank prediction (`glmc.ir.per_rank_memory` with glmc train's assumptions) to the byte."""

from __future__ import annotations

from typing import Any

import pytest

from glmc.api import resolve_spec
from glmc.cli import main
from glmc.errors import GlmcError
from glmc.ir import TrainingAssumptions, per_rank_memory
from glmc.pipeline import compile_graph
from glmc.spec import ModelSpec
from glmc.train.config import TrainConfig
from glmc.train.dryrun import PARAM_KEYS, dry_run, roles

GiB = 2**30


def _config(pipeline: str, **changes: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "spec": "glm-tiny", "pipeline": pipeline, "seq_len": 32, "batch_size": 4, "compile": False,
    }  # fmt: skip
    return TrainConfig(**(base | changes))


def _assert_equal_to_ir(report: Any, cfg: TrainConfig) -> None:
    """Every role was built and holds, to the byte, what the IR predicts for its stage; the IR's
    per-rank figures are the most any rank of a stage holds, so they equal the first rank's."""
    graph = compile_graph(resolve_spec(cfg.spec), report.pipeline)
    ir = per_rank_memory(graph, TrainingAssumptions.glmc_train(cfg.optimizer, cfg.fsdp))
    assert sum(r.role.ranks for r in report.reports) == report.world
    assert sorted({r.role.stage for r in report.reports}) == list(range(report.mesh["pp"]))
    for r in report.reports:
        assert r.built, r.note
        stage = ir["stages"][r.role.stage]
        expect = {
            "param_bytes": stage["param_bytes"],
            "grad_bytes": stage["grad_bytes"],
            "optimizer_bytes": stage["master_bytes"] + stage["optimizer_bytes"],
        }
        got = {k: r.measured[k] for k in PARAM_KEYS}
        assert got == expect, f"{r.role.describe()}: held {got}, the IR predicts {expect}"
        # The step ran: a peak above the training state it holds, activations counted.
        held = sum(got.values())
        assert r.measured["activation_peak_bytes"] > 0
        assert r.measured["peak_bytes"] > r.measured["activation_peak_bytes"]
        assert r.measured["peak_bytes"] >= held // 2  # at the peak, most of the state is live
    assert report.equal


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pipeline", "changes", "n_roles"),
    [
        ("shard{dp=2,ep=2}", {}, 1),  # FSDP2 over dp x ep, experts split over ep
        ("shard{ep=2,tp=2}", {}, 1),  # TP DTensors with expert-TP columns and EP slots
        ("shard{pp=2,dp=2}", {"grad_accum": 2, "batch_size": 4}, 2),  # 1F1B stages, 2 micro-batches
        ("shard{ep=2,redundant_experts=2}", {"optimizer": "adamw"}, 1),  # replicated expert slots
    ],
    ids=["dp2-ep2", "ep2-tp2", "pp2-dp2", "ep2-redundant-adamw"],
)
def test_dry_run_holds_what_the_ir_predicts(pipeline: str, changes: dict[str, Any], n_roles: int) -> None:
    cfg = _config(pipeline, **changes)
    report = dry_run(cfg, device_memory=GiB)
    assert len(report.reports) == n_roles
    _assert_equal_to_ir(report, cfg)
    assert all(r.fits(GiB) for r in report.reports)  # glm-tiny: a few MB per rank
    assert not any(r.fits(1) for r in report.reports)


# GLM-4.5's widths (hidden 5120, 160 experts of 1536, vocabulary 151,552) on two trunk layers and
# the MTP layer: 9.3 B parameters, 37 GB in fp32 before gradients and optimizer state.
GLM45_SLICE = {
    **resolve_spec("glm-4.5").model_dump(mode="json"),
    "name": "glm-4.5-slice",
    "num_layers": 2,
    "num_dense_layers": 1,
}


@pytest.mark.slow
def test_a_model_larger_than_this_machine_is_never_allocated() -> None:
    spec = ModelSpec.from_dict(GLM45_SLICE, source="test")
    cfg = TrainConfig(spec=spec, pipeline="shard{ep=2}", seq_len=4096, batch_size=2, compile=False)
    report = dry_run(cfg, device_memory=141 * GiB)
    _assert_equal_to_ir(report, cfg)
    (role,) = report.reports
    held = sum(role.measured[k] for k in PARAM_KEYS)
    assert held > 40 * GiB  # per rank: half the experts, half of every FSDP2-sharded weight
    assert report.peak_rss_bytes < 4 * GiB  # every process of the dry run, children included


def test_roles_of_a_256_rank_glm45_plan() -> None:
    graph = compile_graph(resolve_spec("glm-4.5"), "fuse-moe,shard{pp=4,ep=32,dp=2}")
    found = roles(graph)
    # Contiguous experts: every rank of a stage holds 5 slots per MoE layer, so one role per stage,
    # played first by the rank at (stage, 0, 0, 0) of the (pp, dp, ep, tp) mesh.
    assert [(r.stage, r.rank, r.ranks) for r in found] == [(s, 64 * s, 64) for s in range(4)]
    assert all(set(r.slots) == {5} for r in found)


def test_a_plan_the_launch_does_not_match_is_refused_before_any_model(capsys: Any) -> None:
    with pytest.raises(GlmcError, match=r"needs 4 processes but the launch has 3"):
        dry_run(_config("shard{dp=2,ep=2}"), world=3)
    argv = ["train", "glm-tiny", "--pipeline", "shard{dp=2,ep=2}", "--dry-run", "--world", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs 4 processes but the launch has 3" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run", "--device-memory", "12XB"], "--device-memory '12XB' is not a size"),
        (["--dry-run", "--device-memory", "0GiB"], "--device-memory must be a positive size"),
        (["--dry-run", "--world", "0"], "--world must be a positive integer"),
        (["--world", "4"], "--world belongs to --dry-run"),
        ([], "--data is required"),
    ],
    ids=["unit", "zero-memory", "zero-world", "world-without-dry-run", "no-data"],
)
def test_bad_dry_run_options_exit_2(capsys: Any, args: list[str], message: str) -> None:
    assert main(["train", "glm-tiny", "--pipeline", "shard{dp=2}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_prints_each_role_next_to_the_ir(capsys: Any) -> None:
    argv = [
        "train", "glm-tiny", "--pipeline", "shard{dp=2}", "--dry-run", "--seq-len", "32",
        "--batch-size", "2", "--no-compile", "--device-memory", "141GiB",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "per-rank bytes equal the IR's: yes" in out
    assert "stage 0" in out and "yes" in out and "peak RSS" in out
