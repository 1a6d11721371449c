"""Expert placements other than the contiguous split, as the shard pass plans them from
`expert_load` (a measured histogram of tokens per expert) and `redundant_experts` (replicas of
the busiest experts): 20 steps on 4 gloo ranks train what one process trains
(`_dist.assert_same_run`: losses, grad norms, every gradient and weight, final weights), every
rank holds exactly the parameter and optimizer bytes `glmc inspect --train` predicts, and a
checkpoint of such a layout (gathered to whole experts, sliced back on load) resumes bit for bit.

The histogram is skewed on purpose: the load-aware map is then not the contiguous one, and the
replicas go to the two busiest experts (one copy per ep rank, so each is on both ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmc.ir import shard_specs
from glmc.lower import lower
from glmc.passes import _expert_placement as placement
from glmc.pipeline import run_pipeline
from glmc.presets import get

from ._dist import Probe, Run, assert_resume_is_exact, assert_same_run, bytes_worker, probed_train, spawn
from .conftest import STDLIB_JSON, tiny_config
from .test_shard_plans import inspect_train

STEPS = 20
# glm-tiny's 8 experts; expert 0 and 2 carry most tokens.
LOADS = [100, 1, 50, 3, 7, 20, 2, 9]


@pytest.fixture(scope="module")
def load_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("load") / "expert_load.json"
    path.write_text(json.dumps(LOADS))
    return path


def _plans(load: Path) -> dict[str, tuple[str, int]]:
    return {
        "load-aware": (f"shard{{dp=2,ep=2,expert_load={load}}}", 4),
        "redundant": ("shard{dp=2,ep=2,redundant_experts=2}", 4),
        "load-aware+redundant": (f"shard{{dp=2,ep=2,expert_load={load},redundant_experts=2}}", 4),
        "expert-tp+redundant": (f"shard{{ep=2,tp=2,expert_load={load},redundant_experts=2}}", 4),
    }


def test_the_layouts_are_what_the_tests_mean(load_file: Path) -> None:
    """The plans below place experts non-contiguously and with replicas (so the parity tests
    exercise slot maps, not the contiguous split by another name)."""
    graph = run_pipeline(lower(get("glm-tiny")), _plans(load_file)["load-aware+redundant"][0])
    maps = {sp.index for n in graph.nodes for p in n.params for sp in shard_specs(p) if sp.axis == "ep"}
    assert maps == {placement.balanced([float(x) for x in LOADS], 2, 2)}
    (ranks,) = maps
    assert ranks != placement.contiguous(8, 2)
    assert set(ranks[0]) & set(ranks[1]) == {0, 2}  # the busiest two are on both ranks
    graph = run_pipeline(lower(get("glm-tiny")), _plans(load_file)["load-aware"][0])
    (aware,) = {sp.index for n in graph.nodes for p in n.params for sp in shard_specs(p) if sp.axis == "ep"}
    assert aware != placement.contiguous(8, 2) and len(aware[0]) == 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = probed_train(tiny_config(tmp_path_factory.mktemp("single"), STDLIB_JSON, steps=STEPS))
    assert run.losses[-1] < run.losses[0] - 1.0  # it learns: the runs compared are not constants
    return run


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["load-aware", "redundant", "load-aware+redundant", "expert-tp+redundant"])
def test_layout_trains_what_one_process_trains_and_holds_what_inspect_says(
    tmp_path: Path, load_file: Path, reference: Run, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    pipeline, world = _plans(load_file)[layout]
    predicted = inspect_train(pipeline, capsys)
    cfg = tiny_config(tmp_path, STDLIB_JSON, steps=STEPS, pipeline=pipeline)
    results = spawn(bytes_worker, world, cfg, Probe)
    worst = assert_same_run(results, reference, world)
    print(f"{layout} ({pipeline}) on {world} ranks: largest relative differences {worst}")
    want = {k: predicted["per_rank"][k] for k in ("param_bytes", "optimizer_bytes")}
    for rank, (_, held, _) in results.items():
        assert held == want, f"rank {rank} holds {held}, glmc inspect --train says {want}"


@pytest.mark.slow
def test_resume_of_a_redundant_load_aware_layout_is_exact(tmp_path: Path, load_file: Path) -> None:
    """The checkpoint holds whole experts (replicas written once); resuming reproduces the
    uninterrupted run's losses and its final weights bit for bit."""
    pipeline, world = _plans(load_file)["load-aware+redundant"]

    def cfg(name: str, **changes: object) -> object:
        return tiny_config(tmp_path / name, STDLIB_JSON, steps=6, save_every=3, pipeline=pipeline, **changes)

    assert_resume_is_exact(cfg, world)
