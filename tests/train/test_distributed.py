"""Data parallel (FSDP2 and plain all-reduce), expert parallel and tensor parallel over 2 or 4 gloo
processes train what one process trains with the same global batch: step for step the losses,
the global gradient norm, expert loads, every parameter's full gradient and updated value, and at
the end every weight and router bias (`_dist.assert_same_run`). Losses alone cannot tell: Muon
and AdamW are nearly scale-invariant, so a gradient off by the data-parallel factor moves 20
steps of loss by under 1e-6, while that parameter's gradient is off by 50-100%."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ._dist import (
    Rendezvous,
    Run,
    SpawnTimeoutError,
    Tolerances,
    assert_same_run,
    join_world,
    probed_train,
    run_distributed,
    spawn,
)
from .conftest import STDLIB_JSON, tiny_config

STEPS = 10
# AdamW moves the router faster than Muon: at step 8 a near-tied top-k choice flipped between
# one process and FSDP2 (different batch shapes round differently), after which the expert's
# gradient legitimately differs by 2%. Up to step 7 everything agreed within 2e-6.
ADAMW_STEPS = 6
# AdamW's first steps are nearly sign(g)·lr per element: where a gradient element is rounding noise
# (|g| ~ 1e-8), its update can differ by up to lr between two summation orders (measured: a
# projection 1.4e-5 of the norm apart after step 1), and the gradients then drift 4e-5 apart.
ADAMW_TOL = Tolerances(grad=3e-4, weight=1e-4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Run]:
    """One process per (optimiser, steps), computed on first use."""

    class Refs(dict[tuple[str, int], Run]):
        def __missing__(self, key: tuple[str, int]) -> Run:
            optimizer, steps = key
            out = tmp_path_factory.mktemp(f"single-{optimizer}")
            run = probed_train(tiny_config(out, STDLIB_JSON, steps=steps, optimizer=optimizer))
            assert run.losses[-1] < run.losses[0] - 1.0  # it learns: the runs compared are not constants
            self[key] = run
            return run

    return Refs()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("plan", "world"),
    [
        ({"dp": 2}, 2),  # FSDP2 over both ranks
        ({"dp": 2, "fsdp": False}, 2),  # replicated weights, one flat gradient all-reduce
        ({"ep": 2}, 2),  # shard{ep=2}: experts over ep (all-to-all), FSDP2 over ep for the dense weights
        ({"ep": 2, "fsdp": False}, 2),  # EP=2 with replicated dense weights
        ({"tp": 2}, 2),  # TP=2 (glm-tiny: 4 query, 2 KV heads; experts, vocabulary): same batch on both
        ({"tp": 2}, 4),  # dp=2 x tp=2: FSDP2 over dp composed with TP over tp (one root mesh)
        ({"tp": 2, "fsdp": False}, 4),  # dp=2 x tp=2, dense gradients all-reduced over dp
        ({"dp": 2, "optimizer": "adamw"}, 2),  # fused AdamW over FSDP2's DTensor shards, no Muon
        ({"ep": 2, "tp": 2, "fsdp": False}, 4),  # expert-TP, dense gradients all-reduced over ep
        ({"ep": 2, "tp": 2, "optimizer": "adamw"}, 4),  # AdamW on expert-TP slices and 2-D DTensors
    ],
    ids=[
        "fsdp2",
        "dp2",
        "ep2+fsdp2",
        "ep2",
        "tp2",
        "dp2xtp2+fsdp2",
        "dp2xtp2",
        "fsdp2-adamw",
        "ep2xtp2",
        "ep2xtp2+fsdp2-adamw",
    ],
)
def test_parallel_run_matches_one_process(
    tmp_path: Path, reference: dict[tuple[str, int], Run], plan: dict[str, Any], world: int
) -> None:
    optimizer = plan.get("optimizer", "muon")
    steps = ADAMW_STEPS if optimizer == "adamw" else STEPS
    results = run_distributed(
        tiny_config(tmp_path, STDLIB_JSON, steps=steps, **plan), world=world, probe=True
    )
    tol = ADAMW_TOL if optimizer == "adamw" else Tolerances()
    worst = assert_same_run(results, reference[optimizer, steps], world, tol)
    print(f"{plan} on {world} ranks: largest relative differences {worst}")


# --- the harness itself: a hung rank fails the test within a bound ----------------------------


def _stuck_collective_worker(rank: int, world: int, rdv: Rendezvous, queue: Any) -> None:
    """Rank 0 enters an all-reduce that rank 1 never joins (rank 1 stays alive, as a hung peer)."""
    import torch
    import torch.distributed as dist

    join_world(rank, world, rdv)
    if rank == 1:
        time.sleep(600)
        return
    try:
        dist.all_reduce(torch.ones(1))
        queue.put((rank, "ok", None, None))
    except BaseException as e:
        queue.put((rank, "error", f"{type(e).__name__}: {e}", None))
        raise


def test_a_collective_nobody_joins_fails_its_rank_after_the_timeout():
    res = spawn(_stuck_collective_worker, 2, timeout_s=120, collective_timeout_s=2)
    assert list(res) == [0], res  # rank 1 was stopped once rank 0 failed
    status, message, _ = res[0]
    assert status == "error" and "timed out" in message.lower(), message


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has stopped running; only its exit status is left


def _sleeping_worker(rank: int, world: int, rdv: Rendezvous, queue: Any) -> None:
    """Reports its own pid and a child's, then never finishes (a rank hung outside any collective)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    queue.put((rank, "ok", os.getpid(), child.pid))
    time.sleep(600)


def test_the_watchdog_kills_a_run_that_does_not_finish():
    with pytest.raises(SpawnTimeoutError, match="still going after 30 s") as info:
        spawn(_sleeping_worker, 2, timeout_s=30)  # a rank reports within seconds of starting
    reported = info.value.results
    assert sorted(reported) == [0, 1] and sorted(info.value.pids) == sorted(r[1] for r in reported.values())
    pids = [pid for _, rank_pid, child_pid in reported.values() for pid in (rank_pid, child_pid)]
    deadline = time.monotonic() + 30  # SIGKILL is delivered asynchronously to the children
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids)), [p for p in pids if _alive(p)]
