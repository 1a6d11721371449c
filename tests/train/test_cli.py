"""`glmc train` / `glmc plot` end to end, and bad input stopping before any step (exit 2)."""

import json

import pytest

from glmc.cli import main

FAST = ["--no-compile", "--no-progress", "--no-export", "--seq-len", "32", "--batch-size", "4"]


def _no_step_ran(run):
    metrics = run / "metrics.jsonl"
    return not metrics.exists() or not metrics.read_text().strip()


def test_train_then_plot(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "glm-tiny", "--data", str(corpus), "-o", str(run), "--steps", "3", *FAST]) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for key in ("loss", "mtp_loss", "tokens_per_s", "mfu", "load_imbalance", "lr", "grad_norm"):
        assert key in recs[0]
    assert len(recs[0]["load_imbalance"]) == 3  # two trunk MoE layers and the MTP layer
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "expert_load.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/no/such/corpus"], "training data not found"),
        (
            ["--data", "{corpus}", "--dp", "2"],
            "pp x dp x ep x tp = 1 x 2 x 1 x 1 needs 2 processes but the launch has 1",
        ),
        (["--data", "{corpus}", "--ep", "3"], "shard: ep=3 does not divide moe.num_experts=8"),
        (["--data", "{corpus}", "--batch-size", "100000"], "fewer than one global batch"),
        (["--data", "{corpus}", "--tokenizer", "/no/tokenizer.json"], "tokenizer file not found"),
        (["--data", "{corpus}", "--resume", "{tmp}/missing"], "checkpoint not found"),
    ],
    ids=[
        "missing-data",
        "plan-vs-world",
        "ep-vs-experts",
        "corpus-too-small",
        "missing-tokenizer",
        "missing-ckpt",
    ],
)
def test_bad_input_exits_2_before_any_step(tmp_path, corpus, capsys, args, message):
    run = tmp_path / "run"
    args = [a.format(corpus=corpus, tmp=tmp_path) for a in args]
    argv = ["train", "glm-tiny", "-o", str(run), "--steps", "2", *FAST[:3], *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _no_step_ran(run)


def test_corrupt_checkpoint_exits_2_before_any_step(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "glm-tiny", "--data", str(corpus), "-o", str(run), "--steps", "2", *FAST]) == 0
    ckpt = run / "checkpoints" / "step-000002"
    for f in ckpt.glob("rank-*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])  # truncated shard
    out = tmp_path / "resumed"
    argv = [
        "train",
        "glm-tiny",
        "--data",
        str(corpus),
        "-o",
        str(out),
        "--steps",
        "4",
        *FAST,
        "--resume",
        str(ckpt),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "checkpoint is corrupt" in err and str(ckpt) in err
    assert _no_step_ran(out)
    (ckpt / "trainer.json").write_text("{not json")
    assert main(argv) == 2
    assert "corrupt" in capsys.readouterr().err


def test_tokenizer_larger_than_the_vocab_is_refused(tmp_path, corpus, capsys):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(600)}, unk_token="w0"))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    argv = [
        "train",
        "glm-tiny",
        "--data",
        str(corpus),
        "-o",
        str(tmp_path / "r"),
        *FAST,
        "--tokenizer",
        str(path),
    ]
    assert main(argv) == 2
    assert "has 600 tokens but the model's vocab_size is 512" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_expert_parallel(tmp_path, corpus):
    """The real launcher: torchrun --nproc_per_node=2 running `glmc train --ep 2` on gloo."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "glmc.cli", "train", "glm-tiny", "--data", str(corpus), "-o", str(run),
           "--steps", "3", "--ep", "2", *FAST]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]  # rank 0 writes the log, once per step
    ckpt = run / "checkpoints" / "step-000003"
    assert sorted(f.name for f in ckpt.iterdir()) == [
        "rank-00000.safetensors",
        "rank-00001.safetensors",
        "trainer.json",
    ]
    assert proc.stdout.count("trained steps") == 1
