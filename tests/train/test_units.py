"""Pieces of the trainer: sampler, tokenizer, losses, schedule, plan checks (the optimisers:
test_optim.py); the test fixtures' restoring of global state."""

import math

import pytest
import torch

from glmc.errors import GlmcError
from glmc.train.data import ByteTokenizer, PackedData, check_vocab
from glmc.train.losses import mtp_loss, sequence_balance_loss
from glmc.train.optim import lr_factor
from glmc.train.plan import ParallelPlan


def test_sampler_shards_the_global_batch_and_is_deterministic():
    data = PackedData.pack(torch.arange(10_000, dtype=torch.int32), seq_len=15, seed=3)
    for step in (0, 7, 1000):  # 1000 is past the first epoch
        whole, _ = data.batch(step, 8, 0, 1)
        parts = [data.batch(step, 8, r, 4)[0] for r in range(4)]
        assert torch.equal(torch.cat(parts), whole)
    ids, labels = data.batch(5, 8, 0, 1)
    assert torch.equal(ids[:, 1:], labels[:, :-1]) and ids.shape == (8, 15)
    assert not torch.equal(data.batch(0, 8, 0, 1)[0], data.batch(1, 8, 0, 1)[0])


def test_byte_tokenizer_round_trip_and_vocab_check():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("déjà vu")) == "déjà vu"
    check_vocab(tok, 258)
    with pytest.raises(GlmcError, match="258 tokens but the model's vocab_size is 200"):
        check_vocab(tok, 200)


def test_mtp_loss_predicts_two_ahead():
    V, labels = 7, torch.randint(0, 7, (2, 6))
    onehot = torch.nn.functional.one_hot(labels[:, 1:], V).float() * 50  # [B, S-1, V]
    assert mtp_loss([onehot], labels) < 1e-6  # MTP position t is scored against labels[t+1]


def test_sequence_balance_loss_matches_the_formula():
    B, T, E, k = 2, 5, 4, 2
    scores = torch.rand(B, T, E)
    want = 0.0
    for b in range(B):
        s = scores[b]
        top = s.topk(k, -1).indices
        f = torch.tensor([(top == i).sum().item() for i in range(E)]) * E / (k * T)
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        want += float((f * p).sum()) / B
    got = sequence_balance_loss([(scores, scores.topk(k, -1).indices)], k)
    assert math.isclose(float(got), want, rel_tol=1e-6)
    assert math.isclose(
        float(sequence_balance_loss([(torch.full((1, 8, E), 0.5), None)], k)), 1.0, rel_tol=1e-6
    )


def test_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_the_shorthands_are_a_shard_pass():
    from glmc.train.plan import plan_pipeline

    # --dp defaults to the world over ep x tp x pp; one process without options runs no pass.
    assert plan_pipeline(None, dp=None, ep=1, tp=1, pp=1, world=1) is None
    assert plan_pipeline(None, dp=None, ep=2, tp=1, pp=1, world=4) == "shard{dp=2,ep=2,tp=1,pp=1}"
    assert (
        plan_pipeline("fuse-moe", dp=None, ep=1, tp=2, pp=1, world=2) == "fuse-moe,shard{dp=1,ep=1,tp=2,pp=1}"
    )
    # A pipeline with its own shard pass is the plan; shorthands may repeat it, not contradict it.
    assert plan_pipeline("shard{ep=2}", dp=1, ep=2, tp=1, pp=1, world=2) == "shard{ep=2}"
    with pytest.raises(
        GlmcError, match=r"--tp 2 disagree with the pipeline's shard pass \(dp=1 ep=2 tp=1 pp=1\)"
    ):
        plan_pipeline("shard{ep=2}", dp=None, ep=1, tp=2, pp=1, world=2)


def test_plan_checks_live_in_the_pass_and_name_the_degree():
    from glmc import presets
    from glmc.api import compile_graph
    from glmc.passes.shard import check_launch

    tiny = presets.get("glm-tiny")
    check_launch(compile_graph(tiny, "shard{dp=2,ep=2}"), 4)
    check_launch(compile_graph(tiny), 1)
    with pytest.raises(
        GlmcError, match=r"pp x dp x ep x tp = 1 x 2 x 2 x 1 needs 4 processes but the launch has 2"
    ):
        check_launch(compile_graph(tiny, "shard{dp=2,ep=2}"), 2)
    with pytest.raises(GlmcError, match=r"ep=3 does not divide moe\.num_experts=8"):
        compile_graph(tiny, "shard{ep=3}")
    with pytest.raises(GlmcError, match=r"tp=3 does not divide attention\.num_heads=4"):
        compile_graph(tiny, "shard{tp=3}")


def test_plan_comes_from_the_shard_pass():
    from glmc import presets
    from glmc.api import compile_graph

    tiny = presets.get("glm-tiny")
    assert ParallelPlan.from_graph(compile_graph(tiny)) == ParallelPlan()
    # One meaning of each degree: the pass's mesh, world = pp x dp x ep x tp.
    plan = ParallelPlan.from_graph(compile_graph(tiny, "shard{dp=2,ep=2}"))
    assert (plan.dp, plan.ep, plan.tp, plan.pp, plan.world, plan.data_parallel) == (2, 2, 1, 1, 4, 4)
    plan = ParallelPlan.from_graph(compile_graph(tiny, "shard{ep=2,tp=2}"))
    assert (plan.world, plan.data_parallel, plan.edp) == (4, 2, 1)


def test_a_shard_plan_that_does_not_fit_the_launch_stops_the_cli(tmp_path, corpus, capsys):
    from glmc.cli import main

    argv = ["train", "glm-tiny", "--data", str(corpus), "-o", str(tmp_path / "r"), "--no-compile",
            "--pipeline", "shard{ep=2}"]  # fmt: skip
    assert main(argv) == 2
    assert (
        "pp x dp x ep x tp = 1 x 1 x 2 x 1 needs 2 processes but the launch has 1" in capsys.readouterr().err
    )


def test_global_state_is_put_back_after_a_test():
    """What the autouse fixtures restore around every test and module: threads, default dtype,
    RNG, grad mode, environment and the dynamo flag the compiled trainer sets."""
    import os

    import torch._dynamo

    from .conftest import one_thread

    before = (torch.get_num_threads(), torch.get_default_dtype(), torch.get_rng_state(), dict(os.environ))
    flag = torch._dynamo.config.capture_scalar_outputs
    with one_thread():
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        torch.set_default_dtype(torch.float64)
        torch.manual_seed(1234)
        torch.set_grad_enabled(False)
        os.environ["GLMC_TEST_LEAK"] = "1"
        os.environ.pop("TRITON_INTERPRET", None)
        torch._dynamo.config.capture_scalar_outputs = not flag
    assert torch.get_num_threads() == before[0]
    assert torch.get_default_dtype() == before[1]
    assert torch.equal(torch.get_rng_state(), before[2])
    assert torch.is_grad_enabled()
    assert dict(os.environ) == before[3]
    assert torch._dynamo.config.capture_scalar_outputs == flag
