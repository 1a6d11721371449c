"""Distributed checkpoints resume exactly; trained weights export to a folder transformers loads."""

import json

import pytest
import torch

import glmc
from glmc.train import train
from glmc.train.checkpoint import latest, read_model_state

from ._dist import run_distributed
from .conftest import tiny_config


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    full = train(tiny_config(tmp_path / "full", corpus, steps=6, save_every=3)).records
    ckpt = tmp_path / "full" / "checkpoints" / "step-000003"
    # safetensors and JSON only: nothing in a run folder is ever unpickled.
    assert sorted(f.name for f in ckpt.iterdir()) == ["rank-00000.safetensors", "trainer.json"]
    resumed = train(tiny_config(tmp_path / "resumed", corpus, steps=6, resume=str(ckpt))).records
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]  # bit for bit
    assert [r["load_imbalance"] for r in resumed] == [r["load_imbalance"] for r in full[3:]]


def test_resume_auto_continues_the_metrics_file(tmp_path, corpus):
    run = tmp_path / "run"
    train(tiny_config(run, corpus, steps=3))
    assert latest(run) == run / "checkpoints" / "step-000003"
    train(tiny_config(run, corpus, steps=5, resume="auto"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("plan", "world"),
    [({"ep": 2}, 2), ({"dp": 2, "grad_accum": 2}, 2), ({"tp": 2}, 2), ({"tp": 2}, 4)],
    ids=["ep2+fsdp2", "fsdp2+grad-accum2", "tp2", "fsdp2xtp2"],
)
def test_resume_from_a_distributed_checkpoint_is_exact(tmp_path, corpus, plan, world):
    """Over gloo ranks: resuming reproduces the uninterrupted run bit for bit; the same
    checkpoint, read back on one process (its shards reassembled), continues within float noise.
    fsdp2xtp2 (4 ranks) stores 2-D DTensors (FSDP2's strided shard over dp, TP over tp) and
    FSDP2-only weights on the dp slice of each tp index, replicated over tp."""
    full = run_distributed(tiny_config(tmp_path / "full", corpus, steps=6, save_every=3, **plan), world)
    for rank in range(world):
        assert full[rank][0] == "ok", full[rank]
    ckpt = tmp_path / "full" / "checkpoints" / "step-000003"
    assert sorted(f.name for f in ckpt.iterdir()) == [
        *(f"rank-{r:05d}.safetensors" for r in range(world)),
        "trainer.json",
    ]
    resumed = run_distributed(
        tiny_config(tmp_path / "resumed", corpus, steps=6, resume=str(ckpt), **plan), world
    )
    for rank in range(world):
        assert resumed[rank][0] == "ok", resumed[rank]
        assert resumed[rank][1] == full[rank][1][3:]  # exactly the uninterrupted run's losses
    one = train(tiny_config(tmp_path / "one", corpus, steps=6, resume=str(ckpt))).records
    assert [r["step"] for r in one] == [4, 5, 6]
    for a, b in zip([r["loss"] for r in one], full[0][1][3:], strict=True):
        assert abs(a - b) / b < 1e-4, (a, b)


def test_model_state_reads_back_what_was_trained(tmp_path, corpus):
    """`read_model_state` assembles the checkpoint's model tensors: they are the weights the
    Hugging Face export wrote at the same step (names without `lm.`)."""
    res = train(tiny_config(tmp_path / "run", corpus, steps=2, export_hf=True))
    assert res.checkpoint is not None and res.hf_dir is not None
    state = read_model_state(res.checkpoint)
    model = glmc.from_pretrained(res.hf_dir)
    ours = model.state_dict()
    assert {k.removeprefix("lm.") for k in state} == set(ours)
    for k, v in state.items():
        assert torch.equal(v, ours[k.removeprefix("lm.")]), k


def test_exported_weights_load_in_transformers(tmp_path, corpus):
    import transformers

    res = train(tiny_config(tmp_path / "run", corpus, steps=2, export_hf=True))
    assert res.hf_dir is not None and (res.hf_dir / "config.json").is_file()
    ours = glmc.from_pretrained(res.hf_dir)
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(res.hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 258, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    # The trained router biases travel with the weights (they moved away from zero).
    bias = ours.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0
