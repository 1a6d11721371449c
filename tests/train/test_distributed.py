"""Data parallel (FSDP2), expert parallel and attention tensor parallel over 2 gloo processes give the same losses as one
process with the same global batch, step for step (the issue's parity requirement)."""

import pytest
import torch

from glmc.train import train

from ._dist import run_distributed
from .conftest import tiny_config


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory, request):
    from .conftest import STDLIB_JSON

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("single")
    return [r["loss"] for r in train(tiny_config(out, STDLIB_JSON)).records]


def _check(results, single, world=2):
    assert sorted(results) == list(range(world)), results
    for rank, (status, losses, detail) in results.items():
        assert status == "ok", f"rank {rank}: {losses}\n{detail}"
        assert len(losses) == len(single) == 20
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, single, strict=True))
        assert rel < 1e-4, (rank, rel, losses, single)
    assert single[-1] < single[0] - 1.0  # it learns, so the comparison is not between constants


@pytest.mark.slow
@pytest.mark.parametrize(
    "plan",
    [
        {"dp": 2},  # FSDP2 over both ranks
        {"dp": 2, "ep": 2},  # EP=2 experts (all-to-all), FSDP2 for the dense weights
        {"dp": 2, "ep": 2, "fsdp": False},  # EP=2 with replicated dense weights
        {"tp": 2},  # attention TP=2 (glm-tiny: 4 query, 2 KV heads), dp=1: same batch on both ranks
    ],
    ids=["fsdp2", "ep2+fsdp2", "ep2", "tp2"],
)
def test_two_ranks_match_one_process_for_20_steps(tmp_path, corpus, single_losses, plan):
    results = run_distributed(tiny_config(tmp_path, corpus, **plan), world=2)
    _check(results, single_losses)


@pytest.mark.slow
def test_fsdp2_with_attention_tp_on_a_2x2_mesh_matches_one_process(tmp_path, corpus, single_losses):
    """dp=2 x tp=2 over 4 gloo processes: FSDP2 over dp composed with TP over tp (one root mesh)."""
    results = run_distributed(tiny_config(tmp_path, corpus, tp=2), world=4)
    _check(results, single_losses, world=4)
