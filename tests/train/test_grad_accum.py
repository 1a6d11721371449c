"""Gradient accumulation: `batch_size` stays the global batch of one optimizer step and is cut into
`grad_accum` micro-batches, so batch 4 x grad_accum 1 and batch 4 as 2 micro-batches of 2 train on
the same tokens and reach the same losses, gradient norms, weights and router biases — on one
process and under FSDP2 (which then reduce-scatters once per step, not once per micro-batch)."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest

from glmc.cli import main
from glmc.errors import GlmcError
from glmc.train import TrainConfig, train
from glmc.train.trainer import micro_batch_size

from ._dist import Run, assert_same_run, probed_train, run_distributed, spawn, train_worker
from .conftest import tiny_config

STEPS = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One process, fp32, batch 4 in one piece; loss-free balancing, MTP and balance loss on."""
    from .conftest import STDLIB_JSON

    cfg = tiny_config(tmp_path_factory.mktemp("ref"), STDLIB_JSON, steps=STEPS, dtype="fp32")
    assert cfg.bias_update_rate > 0 and cfg.balance_loss > 0 and cfg.mtp_weight > 0
    return probed_train(cfg)


@pytest.mark.parametrize("accum", [2, 4])
def test_micro_batches_match_the_full_batch_on_one_process(tmp_path, corpus, reference, accum):
    run = probed_train(tiny_config(tmp_path, corpus, steps=STEPS, dtype="fp32", grad_accum=accum))
    worst = assert_same_run({0: ("ok", run.losses, run)}, reference, world=1)
    print(f"grad_accum={accum}: largest relative differences {worst}")
    # Telemetry counts the whole global batch per optimizer step, not one micro-batch.
    for r in run.records:
        assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_time_s"])


def test_resume_with_grad_accum_reproduces_the_uninterrupted_run(tmp_path, corpus):
    kw: dict[str, Any] = {"steps": 4, "grad_accum": 2}
    full = train(tiny_config(tmp_path / "full", corpus, save_every=2, **kw)).records
    ckpt = tmp_path / "full" / "checkpoints" / "step-000002"
    resumed = train(tiny_config(tmp_path / "resumed", corpus, resume=str(ckpt), **kw)).records
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]  # bit for bit
    assert [r["load_imbalance"] for r in resumed] == [r["load_imbalance"] for r in full[2:]]


# --- FSDP2 over 2 gloo ranks ---------------------------------------------------------------


class _TaggedQueue:
    """Passes the worker's result on with this rank's reduce-scatter count next to its losses."""

    def __init__(self, queue: Any, count: list[int]) -> None:
        self.queue, self.count = queue, count

    def put(self, item: tuple[int, str, Any, Any]) -> None:
        rank, status, a, b = item
        self.queue.put((rank, status, (a, self.count[0]) if status == "ok" else a, b))


def _counting_worker(rank: int, world: int, rdv: Any, cfg: Any, queue: Any) -> None:
    """`_dist.train_worker` under the probe, counting the reduce-scatters FSDP2 issues (its
    gradient sync)."""
    import torch.distributed as dist

    count = [0]

    def counted(fn: Any) -> Any:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return fn(*args, **kwargs)

        return run

    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name)))
    train_worker(rank, world, rdv, cfg, True, _TaggedQueue(queue, count))


@pytest.mark.slow
def test_fsdp2_micro_batches_match_one_process_and_sync_once_per_step(tmp_path, corpus, reference):
    """dp=2 x grad_accum 2: each rank runs 2 micro-batches of 1 sequence per step."""
    counts = {}
    for accum in (1, 2):
        cfg = tiny_config(
            tmp_path / f"accum{accum}", corpus, steps=STEPS, dtype="fp32", dp=2, grad_accum=accum
        )
        res = spawn(_counting_worker, 2, cfg)
        worst = assert_same_run(res, reference, world=2)
        (_, rs0), (_, rs1) = res[0][1], res[1][1]
        assert rs0 == rs1 > 0
        counts[accum] = rs0
        print(f"FSDP2 dp=2 grad_accum={accum}: largest relative differences {worst}")
    # The first micro-batch's backward keeps its gradients unsharded: no extra reduce-scatter.
    assert counts[2] == counts[1], counts


@pytest.mark.slow
def test_expert_parallel_micro_batches_match_one_process(tmp_path, corpus, reference):
    """ep=2 x grad_accum 2 (FSDP2 around EP): the all-to-all runs in every micro-batch, the
    gradients sync once; the same run as one process with the whole batch."""
    cfg = tiny_config(tmp_path, corpus, steps=STEPS, dtype="fp32", ep=2, grad_accum=2)
    worst = assert_same_run(run_distributed(cfg, probe=True), reference, world=2)
    print(f"EP=2 grad_accum=2: largest relative differences {worst}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("plan", "world"),
    [({"tp": 2}, 2), ({"ep": 2, "tp": 2}, 4), ({"dp": 2, "fsdp": False}, 2)],
    ids=["tp2", "ep2xtp2", "dp2-no-fsdp"],
)
def test_micro_batches_under_tp_and_without_fsdp_match_one_process(tmp_path, corpus, reference, plan, world):
    """grad_accum 2 with the plans whose extra gradient reductions (TP norms, expert-TP columns
    and slots, `--no-fsdp` data parallel) must run once per step, after the last micro-batch."""
    cfg = tiny_config(tmp_path, corpus, steps=STEPS, dtype="fp32", grad_accum=2, **plan)
    worst = assert_same_run(run_distributed(cfg, world=world, probe=True), reference, world=world)
    print(f"{plan} on {world} ranks, grad_accum=2: largest relative differences {worst}")


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_grad_accum_must_be_a_positive_integer(bad):
    with pytest.raises(GlmcError, match=r"grad_accum \(--grad-accum\) must be an integer >= 1"):
        TrainConfig(grad_accum=bad)  # type: ignore[arg-type]


def test_batch_must_divide_into_micro_batches():
    with pytest.raises(GlmcError, match=r"batch_size \(--batch-size\) 6 must be a multiple of grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    cfg = TrainConfig(batch_size=4, grad_accum=4)  # fine on one rank, not over dp=2
    assert micro_batch_size(cfg, 1) == 1
    with pytest.raises(GlmcError, match=r"data-parallel degree 2 times --grad-accum 4"):
        micro_batch_size(cfg, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grad-accum", "0"], "grad_accum (--grad-accum) must be an integer >= 1, got 0"),
        (
            ["--grad-accum", "3"],
            "batch_size (--batch-size) 4 must be a multiple of grad_accum (--grad-accum) 3",
        ),
    ],
    ids=["zero", "not-divisible"],
)
def test_cli_bad_grad_accum_exits_2(tmp_path, corpus, capsys, args, message):
    run = tmp_path / "run"
    argv = ["train", "glm-tiny", "--data", str(corpus), "-o", str(run), "--no-compile", "--no-progress"]
    assert main([*argv, "--seq-len", "32", "--batch-size", "4", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (run / "metrics.jsonl").exists()


def test_cli_grad_accum_flag_trains(tmp_path, corpus):
    run = tmp_path / "run"
    argv = ["train", "glm-tiny", "--data", str(corpus), "-o", str(run), "--steps", "2", "--no-compile"]
    opts = ["--no-progress", "--no-export", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2"]
    assert main([*argv, *opts]) == 0
    assert (run / "checkpoints" / "step-000002" / "rank-00000.safetensors").is_file()
    trainer = json.loads((run / "checkpoints" / "step-000002" / "trainer.json").read_text())
    assert trainer["config"]["grad_accum"] == 2
