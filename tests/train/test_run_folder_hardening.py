"""Run folders and training checkpoints as untrusted input: planted pickles are refused without
being run, an old run is never continued by accident, corrupt or foreign checkpoints and bad
numbers stop with exit code 2 naming the file or flag, and a full disk leaves no partial
checkpoint."""

from __future__ import annotations

import errno
import json
import pickle
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import glmc
from glmc.cli import main
from glmc.errors import GlmcError
from glmc.train import TrainConfig, train

from .conftest import tiny_config

FAST = ["--no-compile", "--no-progress", "--no-export", "--seq-len", "32", "--batch-size", "4"]


def _argv(run: Path, corpus: Path, *extra: str, steps: int = 2) -> list[str]:
    return ["train", "glm-tiny", "--data", str(corpus), "-o", str(run), "--steps", str(steps), *FAST, *extra]


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("glmc: error:")]
    assert len(lines) == 1, err
    return lines[0]


class _Payload:
    """Unpickling this creates `marker`: what a crafted checkpoint file could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


def _malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def test_the_planted_payload_runs_code_when_unpickled(tmp_path):
    """The payload the next test plants is live: unpickling it really creates the marker."""
    marker = tmp_path / "ran"
    pickle.loads(_malicious_pickle(marker))
    assert marker.is_file()


@pytest.mark.parametrize("planted", [".metadata", "rng-0.pt", "__0_0.distcp"])
def test_a_planted_pickle_is_refused_without_running(tmp_path, corpus, capsys, planted):
    run = tmp_path / "run"
    assert main(_argv(run, corpus)) == 0
    ckpt = run / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    (ckpt / planted).write_bytes(_malicious_pickle(marker))
    before = (run / "metrics.jsonl").read_text()
    assert main(_argv(run, corpus, "--resume", "auto", steps=4)) == 2
    line = _one_line_error(capsys)
    assert str(ckpt / planted) in line and "pickle" in line
    assert not marker.exists()
    assert (run / "metrics.jsonl").read_text() == before  # nothing ran


def test_resume_never_unpickles(tmp_path, corpus, monkeypatch):
    """With every unpickling entry point (and torch.load) made to fail, resume still works and
    reproduces the uninterrupted run."""
    full = train(tiny_config(tmp_path / "full", corpus, steps=4, save_every=2)).records

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling during resume")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ckpt = tmp_path / "full" / "checkpoints" / "step-000002"
    resumed = train(tiny_config(tmp_path / "resumed", corpus, steps=4, resume=str(ckpt))).records
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]


# --- an old run in the run folder (item: -o OLD_RUN without --resume) --------------------------


def test_a_non_empty_run_folder_needs_resume_or_force(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, corpus, steps=4)) == 0
    old = (run / "metrics.jsonl").read_text()
    assert main(_argv(run, corpus, "--seed", "1", "--lr", "1e-3")) == 2
    line = _one_line_error(capsys)
    assert str(run) in line and "--resume auto" in line and "--force" in line
    assert (run / "metrics.jsonl").read_text() == old
    # --force starts over: the old checkpoints and metrics are gone, so a later --resume auto
    # continues this run, not the old one.
    assert main(_argv(run, corpus, "--seed", "1", "--force", steps=2)) == 0
    assert "deleted the contents" in capsys.readouterr().err
    assert _steps(run) == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert main(_argv(run, corpus, "--seed", "1", "--resume", "auto", steps=3)) == 0
    assert _steps(run) == [1, 2, 3]


def test_force_and_resume_together_are_refused(tmp_path, corpus, capsys):
    assert main(_argv(tmp_path / "run", corpus, "--force", "--resume", "auto")) == 2
    assert "--force" in _one_line_error(capsys)


@pytest.mark.parametrize("where", ["cwd", "ancestor-of-cwd", "home", "holds-input"])
def test_force_never_clears_a_folder_that_matters(tmp_path, corpus, capsys, monkeypatch, where):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    keep = run / "keep.txt"
    keep.write_text("user file\n" * 50)
    data = corpus
    if where == "cwd":
        monkeypatch.chdir(run)
    elif where == "ancestor-of-cwd":
        monkeypatch.chdir(run / "sub")
    elif where == "home":
        monkeypatch.setenv("HOME", str(run))
    else:
        data = keep
    assert main(_argv(run, data, "--force")) == 2
    line = _one_line_error(capsys)
    assert "--force will not delete" in line
    assert keep.is_file() and (run / "sub").is_dir()


# --- --resume auto without a checkpoint ----------------------------------------------------------


def test_resume_auto_in_an_empty_folder_starts_fresh_and_says_so(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, corpus, "--resume", "auto")) == 0
    assert "no checkpoint in" in capsys.readouterr().err
    assert _steps(run) == [1, 2]


def test_resume_auto_without_a_checkpoint_never_overwrites_metrics(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, corpus, steps=3)) == 0
    for p in (run / "checkpoints").iterdir():  # as if stopped before its first checkpoint
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    before = (run / "metrics.jsonl").read_text()
    assert main(_argv(run, corpus, "--resume", "auto", steps=5)) == 2
    line = _one_line_error(capsys)
    assert "no complete checkpoint" in line and str(run) in line
    assert (run / "metrics.jsonl").read_text() == before


# --- corrupt and foreign checkpoints -----------------------------------------------------------


def _latest(run: Path) -> Path:
    return sorted((run / "checkpoints").iterdir())[-1]


def test_a_truncated_rank_file_exits_2_naming_it(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, corpus)) == 0
    f = _latest(run) / "rank-00000.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    assert main(_argv(run, corpus, "--resume", "auto", steps=4)) == 2
    line = _one_line_error(capsys)
    assert str(f) in line and "corrupt" in line
    assert _steps(run) == [1, 2]


def test_a_bad_rng_state_exits_2_naming_the_file(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, corpus)) == 0
    f = _latest(run) / "rank-00000.safetensors"
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    tensors = load_file(f)
    tensors["rng/cpu"] = tensors["rng/cpu"][:100]  # a cut-short generator state
    save_file(tensors, str(f), metadata=meta)
    assert main(_argv(run, corpus, "--resume", "auto", steps=4)) == 2
    line = _one_line_error(capsys)
    assert str(f) in line and "RNG" in line
    assert _steps(run) == [1, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 1}, "written with --seed 0, this run has 1"),
        ({"lr": 1e-3}, "written with --lr 0.003, this run has 0.001"),
        ({"batch_size": 8}, "written with --batch-size 4, this run has 8"),
        ({"max_bytes": 20_000}, "written for other training data (sha256"),
        ({"spec": glmc.presets.get("glm-tiny").model_copy(update={"norm_eps": 1e-6})}, "spec norm_eps"),
    ],
    ids=["seed", "lr", "batch", "data", "spec"],
)
def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path, corpus, change, message):
    train(tiny_config(tmp_path / "a", corpus, steps=2))
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    with pytest.raises(GlmcError) as e:
        train(tiny_config(tmp_path / "b", corpus, steps=4, resume=str(ckpt), **change))
    assert message in str(e.value) and str(ckpt) in str(e.value)
    assert not (tmp_path / "b").exists()


def test_resuming_into_a_folder_of_another_run_is_refused(tmp_path, corpus):
    train(tiny_config(tmp_path / "a", corpus, steps=2))
    train(tiny_config(tmp_path / "b", corpus, steps=2))
    with pytest.raises(GlmcError, match="would mix two runs"):
        train(
            tiny_config(
                tmp_path / "b", corpus, steps=4, resume=str(tmp_path / "a" / "checkpoints" / "step-000002")
            )
        )


# --- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--lr", "nan"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--grad-clip", "nan"], "--grad-clip"),
        (["--grad-clip", "-1"], "--grad-clip"),
        (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--mtp-weight", "-0.1"], "--mtp-weight"),
        (["--balance-loss", "inf"], "--balance-loss"),
        (["--bias-update-rate", "nan"], "--bias-update-rate"),
        (["--max-bytes", "nan"], "--max-bytes"),
        (["--max-bytes", "0"], "--max-bytes"),
        (["--max-bytes", "10.5"], "--max-bytes"),
        (["--peak-tflops", "0"], "--peak-tflops"),
        (["--peak-tflops", "nan"], "--peak-tflops"),
        (["--seed", "-1"], "--seed"),
        (["--warmup-steps", "-1"], "--warmup-steps"),
        (["--steps", "0"], "--steps"),
        (["--seq-len", "2"], "--seq-len"),
        (["--log-every", "0"], "--log-every"),
        (["--save-every", "-1"], "--save-every"),
        (["--ep", "0"], "--ep"),
    ],
)
def test_bad_numbers_exit_2_naming_the_flag(tmp_path, corpus, capsys, args, flag):
    run = tmp_path / "run"
    argv = ["train", "glm-tiny", "--data", str(corpus), "-o", str(run), *FAST, *args]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert f"({flag})" in line, line
    assert not run.exists()


def test_betas_must_be_finite_and_below_one():
    for bad in [(0.9, float("nan")), (0.9, 1.0), (-0.1, 0.9), (0.9,)]:
        with pytest.raises(GlmcError, match="betas must be two finite numbers"):
            TrainConfig(betas=bad)  # type: ignore[arg-type]


# --- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_while_checkpointing_exits_2_and_leaves_no_temp_folder(
    tmp_path, corpus, capsys, monkeypatch
):
    import glmc.train.checkpoint as checkpoint

    def full_disk(path: Path, tensors: object, metadata: object) -> None:
        path.write_bytes(b"partial")  # some bytes made it before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "_write_rank_file", full_disk)
    run = tmp_path / "run"
    assert main(_argv(run, corpus)) == 2
    line = _one_line_error(capsys)
    assert "the disk is full" in line and str(run / "checkpoints" / "step-000002") in line
    assert list((run / "checkpoints").iterdir()) == []  # no .step-000002.tmp, no step-000002


def _full_disk_on_rank_1(rank: int, world: int, rdv: Any, cfg: TrainConfig, queue: Any) -> None:
    """A gloo rank whose checkpoint write fails with ENOSPC on rank 1 only."""
    from ._dist import join_world

    try:
        join_world(rank, world, rdv)
        import glmc.train.checkpoint as checkpoint

        if rank == 1:

            def full_disk(path: Path, tensors: object, metadata: object) -> None:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

            checkpoint._write_rank_file = full_disk  # type: ignore[assignment]
        train(cfg)
        queue.put((rank, "ok", None, None))
    except BaseException as e:
        queue.put((rank, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))


@pytest.mark.slow
def test_a_full_disk_on_one_rank_stops_every_rank(tmp_path, corpus):
    """Rank 1 cannot write its part: both ranks stop with one message (no rank waits forever
    for the other) and the partial checkpoint folder is removed."""
    from ._dist import spawn

    run = tmp_path / "run"
    out = spawn(_full_disk_on_rank_1, 2, tiny_config(run, corpus, steps=2, dp=2))
    assert out[1][0] == "error" and out[1][1].startswith("GlmcError: "), out
    assert "the disk is full" in out[1][1], out
    assert out[0][0] == "error" and out[0][1].startswith("GlmcError: "), out
    assert "another rank failed" in out[0][1], out
    assert list((run / "checkpoints").iterdir()) == []
