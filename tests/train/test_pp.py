"""Pipeline-parallel training (`shard{pp=2}` alone, with data parallel and with expert parallel)
trains what one process trains: step for step the losses, the global gradient norm, the expert
loads, every parameter's gradient and updated value, and every final weight and router bias
(`_dist.assert_same_run`, after joining each pipeline's stages into one run).

A stage's ranks hold only their stage's parameters, so each pipeline (the pp ranks at one
data-parallel coordinate) is joined into one "rank" of the comparison. The embedding is held on
the first stage and, for the MTP layer, as a copy on the last: the two must agree at every step
(the copy may not drift), which the join checks before keeping one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ._dist import Probe, Run, Tolerances, assert_same_run, bytes_worker, probed_train, spawn
from .conftest import STDLIB_JSON, tiny_config
from .test_shard_plans import inspect_train

STEPS = 20
EMBEDDING = "lm.model.embed_tokens.weight"


class StageProbe(Probe):
    """`Probe`, plus the final values on every rank (a stage's parameters are not on rank 0)."""

    def _attach(self, model: torch.nn.Module, cfg: Any, opts: list[torch.optim.Optimizer]) -> None:
        from torch.distributed.tensor import DTensor

        super()._attach(model, cfg, opts)
        params = list(model.named_parameters())
        biases = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]

        def full(p: torch.Tensor) -> torch.Tensor:
            piece = getattr(p, "glmc_piece", None)
            t = p.detach()
            if piece is not None:  # expert slots: gathered as the pass split them (a collective)
                return piece.full(t)
            return t.full_tensor() if isinstance(t, DTensor) else t

        @torch.no_grad()
        def after(opt: Any, args: Any, kwargs: Any) -> None:
            if len(self.weights) == cfg.steps:  # Probe's own hook (registered first) has counted it
                values = [(n, full(p)) for n, p in params] + biases
                self.final = {n: v.detach().clone() for n, v in values}

        opts[-1].register_step_post_hook(after)


def _join(parts: list[dict[str, Any]], what: str, tol: float) -> dict[str, Any]:
    """One dict from the stages' dicts; a name on two stages (the embedding and its copy) must
    hold the same value on both."""
    out: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if name in out:
                assert name == EMBEDDING, f"{what}: {name} on two stages"
                a, b = out[name], value
                if isinstance(a, torch.Tensor):
                    torch.testing.assert_close(
                        a, b, rtol=0, atol=0, msg=f"{what}: the embedding copy drifted"
                    )
                else:
                    assert all(
                        abs(x - y) <= tol * max(abs(a[0]), 1e-30) for x, y in zip(a, b, strict=True)
                    ), f"{what}: the embedding copy drifted: {a} vs {b}"
            out[name] = value
    return out


def join_pipelines(
    results: dict[int, tuple[str, Any, Any]], world: int, pp: int
) -> dict[int, tuple[str, Any, Any]]:
    """{data-parallel coordinate: ("ok", losses, Run of its whole pipeline)}: each rank's own
    records must be the pipeline's (losses, norms and loads are global)."""
    for rank, (status, a, b) in results.items():
        assert status == "ok", f"rank {rank}: {a}\n{b}"
    assert sorted(results) == list(range(world)), sorted(results)
    stage_world = world // pp
    out = {}
    for v in range(stage_world):
        runs: list[Run] = [results[s * stage_world + v][2] for s in range(pp)]
        records = runs[-1].records
        for s, run in enumerate(runs):
            assert [r["loss"] for r in run.records] == [r["loss"] for r in records], (
                f"stage {s} logged other losses"
            )
            assert [r["load_imbalance"] for r in run.records] == [r["load_imbalance"] for r in records]
        steps = len(records)
        grads = [_join([r.grads[i] for r in runs], f"gradient at step {i + 1}", 1e-6) for i in range(steps)]
        weights = [_join([r.weights[i] for r in runs], f"weight at step {i + 1}", 0.0) for i in range(steps)]
        final = _join([r.final for r in runs], "final weights", 0.0)
        out[v] = ("ok", [r["loss"] for r in records], Run(records, grads, weights, final))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Run]:
    """One process with the whole batch, per batch size, computed on first use."""

    class Refs(dict[int, Run]):
        def __missing__(self, batch: int) -> Run:
            out = tmp_path_factory.mktemp(f"single-{batch}")
            run = probed_train(tiny_config(out, STDLIB_JSON, steps=STEPS, batch_size=batch))
            assert run.losses[-1] < run.losses[0] - 1.0  # it learns: the runs compared are not constants
            self[batch] = run
            return run

    return Refs()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pipeline", "world", "accum", "batch"),
    [
        ("shard{pp=2}", 2, 2, 4),  # two stages, two micro-batches of 2 sequences
        ("shard{pp=2,dp=2}", 4, 2, 4),  # FSDP2 over each stage's 2 data ranks, micro-batches of 1
        ("shard{pp=2,ep=2}", 4, 2, 4),  # 4 experts per ep rank in each stage, FSDP2 for the rest
        ("shard{pp=3}", 3, 3, 6),  # a middle stage (neither embedding nor head), 3 micro-batches
        ("shard{pp=2,tp=2}", 4, 2, 4),  # tensor parallel inside each stage
    ],
    ids=["pp2", "pp2xdp2", "pp2xep2", "pp3", "pp2xtp2"],
)
def test_pipeline_run_matches_one_process_and_holds_what_inspect_says(
    tmp_path: Path,
    reference: dict[int, Run],
    capsys: pytest.CaptureFixture[str],
    pipeline: str,
    world: int,
    accum: int,
    batch: int,
) -> None:
    predicted = inspect_train(pipeline, capsys)["stages"]
    pp = len(predicted)
    cfg = tiny_config(
        tmp_path, STDLIB_JSON, steps=STEPS, pipeline=pipeline, grad_accum=accum, batch_size=batch
    )
    raw = spawn(bytes_worker, world, cfg, StageProbe)
    results = join_pipelines(raw, world, pp)
    worst = assert_same_run(results, reference[batch], world // pp, Tolerances())
    print(f"{pipeline} on {world} ranks: largest relative differences {worst}")
    # Each rank holds its stage's figures (the last stage's include the embedding copy).
    for rank, (_, held, _) in raw.items():
        row = predicted[rank // (world // pp)]
        want = {k: row[k] for k in ("param_bytes", "optimizer_bytes")}
        assert held == want, (
            f"rank {rank} (stage {row['stage']}) holds {held}, glmc inspect --train says {want}"
        )
        print(f"rank {rank}: holds {held} as glmc inspect --train says")


# --- checkpoints, resume and the Hugging Face export under PP ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pipeline", "world"), [("shard{pp=2}", 2), ("shard{pp=2,ep=2}", 4)], ids=["pp2", "pp2xep2"]
)
def test_pipeline_checkpoints_resume_bit_for_bit_and_export_every_stage(
    tmp_path: Path, pipeline: str, world: int
) -> None:
    import glmc
    from glmc.train import train
    from glmc.train.checkpoint import read_model_state

    from ._dist import run_distributed

    kw: dict[str, Any] = {"steps": 6, "grad_accum": 2, "pipeline": pipeline}
    full = run_distributed(
        tiny_config(tmp_path / "full", STDLIB_JSON, save_every=3, export_hf=True, **kw), world
    )
    assert all(status == "ok" for status, _, _ in full.values()), full
    losses = full[0][1]
    middle = tmp_path / "full" / "checkpoints" / "step-000003"
    resumed = run_distributed(tiny_config(tmp_path / "resumed", STDLIB_JSON, resume=str(middle), **kw), world)
    for rank, (status, got, detail) in resumed.items():
        assert status == "ok", f"rank {rank}: {got}\n{detail}"
        assert got == losses[3:], f"rank {rank}: resumed {got} vs {losses[3:]}"  # bit for bit

    # The export holds every stage's weights: exactly the last checkpoint's model.
    stored = read_model_state(tmp_path / "full" / "checkpoints" / "step-000006")
    exported = glmc.from_pretrained(tmp_path / "full" / "hf").state_dict()
    assert {k.removeprefix("lm.") for k in stored} == set(exported)
    for k, v in stored.items():
        torch.testing.assert_close(exported[k.removeprefix("lm.")], v, rtol=0, atol=0, msg=k)

    # Another plan reads it back: one process continues the pipeline's run (other micro-batch
    # shapes round differently, so close rather than equal).
    alone = train(tiny_config(tmp_path / "alone", STDLIB_JSON, resume=str(middle), steps=6))
    assert [r["loss"] for r in alone.records] == pytest.approx(losses[3:], rel=1e-5)


# --- stages from the passed graph (no processes) ---------------------------------------------------


def test_stages_are_the_pass_s_and_keep_one_process_names() -> None:
    from glmc.api import build_torch, compile_graph, resolve_spec
    from glmc.train.pipeline_parallel import split_stages, stage_plan

    spec = resolve_spec("glm-tiny")  # 3 trunk layers, one MTP layer
    graph = compile_graph(spec, "shard{pp=3}")
    whole = {n for n, _ in build_torch(spec, dtype=torch.float32, seed=0).named_parameters()}
    held: list[set[str]] = []
    for index, (first, last) in enumerate(graph.attrs.pp_stages):
        stage = stage_plan(graph, index)
        assert (stage.first_layer, stage.last_layer) == (first, last)
        # Only the last stage keeps a copy: the MTP layer's embedding.
        assert stage.copies == ({"model.embed_tokens.weight"} if index == 2 else set())
        lm = split_stages(build_torch(spec, dtype=torch.float32, seed=0), stage)
        names = {n for n, _ in lm.named_parameters()}
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert layers == set(range(first, last + 1))
        assert ("model.embed_tokens.weight" in names) == (index in (0, 2))
        assert ("lm_head.weight" in names) == any(n.startswith("model.mtp.") for n in names) == (index == 2)
        held.append(names)
    # Together the stages hold the whole model under its one-process names, the copy twice.
    assert set().union(*held) == whole
    assert sum(map(len, held)) == len(whole) + 1


def test_fewer_micro_batches_than_stages_is_refused_naming_grad_accum() -> None:
    from glmc.errors import GlmcError
    from glmc.train.pipeline_parallel import check_microbatches

    check_microbatches(2, 2)
    check_microbatches(1, 1)
    with pytest.raises(GlmcError, match=r"--grad-accum 1 is the number of pipeline micro-batches.*pp=2"):
        check_microbatches(1, 2)
