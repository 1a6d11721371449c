"""Gradient accumulation: `batch_size` stays the global batch of one optimizer step and is cut into
`grad_accum` micro-batches, so batch 4 x grad_accum 1 and batch 4 as 2 micro-batches of 2 train on
the same tokens and reach the same losses, gradient norms, weights and router biases — on one
process and under FSDP2 (which then reduce-scatters once per step, not once per micro-batch)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from glmc.cli import main
from glmc.errors import GlmcError
from glmc.train import TrainConfig, train
from glmc.train.trainer import micro_batch_size

from ._dist import _worker, run_distributed, spawn
from .conftest import tiny_config

STEPS = 6
ROUTER_BIAS = "e_score_correction_bias"


def _model_state(ckpt: Path | None) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, as full tensors (whatever plan wrote it)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    assert ckpt is not None
    out = ckpt.parent / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    return dict(torch.load(out, weights_only=False)["model"])


def _max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def _assert_same_run(
    records: list[dict[str, Any]],
    state: dict[str, torch.Tensor],
    ref: list[dict[str, Any]],
    ref_state: dict[str, torch.Tensor],
) -> float:
    rel = _max_rel([r["loss"] for r in records], [r["loss"] for r in ref])
    assert rel < 1e-5, rel
    for key in ("lm_loss", "mtp_loss", "balance_loss", "grad_norm"):  # grad_norm: unclipped, so scale-exact
        assert _max_rel([r[key] for r in records], [r[key] for r in ref]) < 1e-5, key
    # Expert loads are summed over the micro-batches before the (single) bias update.
    assert [r["load_imbalance"] for r in records] == [r["load_imbalance"] for r in ref]
    assert state.keys() == ref_state.keys()
    biases = [k for k in ref_state if k.endswith(ROUTER_BIAS)]
    assert len(biases) == 3 and all(ref_state[k].abs().sum() > 0 for k in biases)  # loss-free balancing ran
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    return rel


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """One process, fp32, batch 4 in one piece; loss-free balancing, MTP and balance loss on."""
    from .conftest import STDLIB_JSON

    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path_factory.mktemp("ref"), STDLIB_JSON, steps=STEPS, dtype="fp32")
    assert cfg.bias_update_rate > 0 and cfg.balance_loss > 0 and cfg.mtp_weight > 0
    res = train(cfg)
    return res.records, _model_state(res.checkpoint)


@pytest.mark.parametrize("accum", [2, 4])
def test_micro_batches_match_the_full_batch_on_one_process(tmp_path, corpus, reference, accum):
    res = train(tiny_config(tmp_path, corpus, steps=STEPS, dtype="fp32", grad_accum=accum))
    ref, ref_state = reference
    rel = _assert_same_run(res.records, _model_state(res.checkpoint), ref, ref_state)
    print(f"grad_accum={accum}: max relative loss difference {rel:.2e}")
    # Telemetry counts the whole global batch per optimizer step, not one micro-batch.
    for r in res.records:
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
    """Passes `_worker`'s result on with this rank's reduce-scatter count attached."""

    def __init__(self, queue: Any, count: list[int]) -> None:
        self.queue, self.count = queue, count

    def put(self, item: tuple[int, str, Any, Any]) -> None:
        rank, status, a, b = item
        self.queue.put((rank, status, a, (b, self.count[0]) if status == "ok" else b))


def _counting_worker(rank: int, world: int, port: int, cfg: Any, queue: Any) -> None:
    """`_dist._worker`, counting the reduce-scatters FSDP2 issues (its gradient sync)."""
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
    _worker(rank, world, port, cfg, _TaggedQueue(queue, count))


def _run_two_ranks(cfg: TrainConfig) -> dict[int, tuple[str, Any, Any]]:
    out = spawn(_counting_worker, 2, cfg)
    assert sorted(out) == [0, 1], out
    for rank, (status, a, b) in out.items():
        assert status == "ok", f"rank {rank}: {a}\n{b}"
    return out


@pytest.mark.slow
def test_fsdp2_micro_batches_match_one_process_and_sync_once_per_step(tmp_path, corpus, reference):
    """dp=2 x grad_accum 2: each rank runs 2 micro-batches of 1 sequence per step."""
    ref, ref_state = reference
    counts = {}
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        res = _run_two_ranks(tiny_config(out, corpus, steps=STEPS, dtype="fp32", dp=2, grad_accum=accum))
        (records, rs0), (_, rs1) = res[0][2], res[1][2]
        assert rs0 == rs1 > 0
        counts[accum] = rs0
        rel = _assert_same_run(
            records, _model_state(out / "checkpoints" / f"step-{STEPS:06d}"), ref, ref_state
        )
        print(f"FSDP2 dp=2 grad_accum={accum}: max relative loss difference {rel:.2e}")
    # The first micro-batch's backward keeps its gradients unsharded: no extra reduce-scatter.
    assert counts[2] == counts[1], counts


@pytest.mark.slow
def test_expert_parallel_micro_batches_match_one_process(tmp_path, corpus, reference):
    """ep=2 x grad_accum 2 (FSDP2 around EP): the all-to-all runs in every micro-batch, the
    gradients sync once; same losses as one process with the whole batch."""
    ref, _ = reference
    res = run_distributed(tiny_config(tmp_path, corpus, steps=STEPS, dtype="fp32", ep=2, grad_accum=2))
    for rank in (0, 1):
        assert res[rank][0] == "ok", res[rank]
        for a, b in zip(res[rank][1], [r["loss"] for r in ref], strict=True):
            assert abs(a - b) / b < 1e-5


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
    assert (run / "checkpoints" / "step-000002" / ".metadata").is_file()
    trainer = json.loads((run / "checkpoints" / "step-000002" / "trainer.json").read_text())
    assert trainer["config"]["grad_accum"] == 2
