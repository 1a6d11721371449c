"""The two-node launch of the README, run as two "nodes" on this machine: two `torchrun`
launchers (`--nnodes=2`, one process each) meet through c10d rendezvous on localhost and run
`glmc train` (the CLI's `main`, as `-m glmc.cli train` would) for 5 steps; the run equals one
process with the same global batch step for step (`_dist.assert_same_run`: losses, gradient
norms, expert loads, every parameter's gradient and value, final weights).

Each launcher runs this file as its worker script (`python test_multinode.py OUT -- ARGS`): the
worker trains under `_dist.Probe` and pickles what it saw to `OUT/rank-R.pkl`, the same record
`_dist.spawn` collects from its ranks.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest

STEPS = 5
NODES = 2
TIMEOUT_S = 600  # both launchers: rendezvous, 5 steps of glm-tiny, teardown (seconds of work)

# The same run as `conftest.tiny_config(steps=STEPS)`, as command-line options.
TRAIN_ARGS = [
    "--seq-len", "32", "--batch-size", "4", "--steps", str(STEPS), "--warmup-steps", "2",
    "--no-compile", "--no-progress", "--no-export", "--log-every", "1000000000",
]  # fmt: skip


def _free_port() -> int:
    """A port nobody listens on now. The launcher of node 0 binds it moments later; on the rare
    collision its rendezvous fails and the test says so (no retry hides a real failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launcher(node: int, port: int, run_id: str, out: Path, train_argv: list[str]) -> list[str]:
    """What each node of the README's two-node command runs, with one process per node. Node 0
    hosts the c10d store (on a real cluster the endpoint names node 0, so it does that by
    itself; on one machine both launchers match `localhost`, so the flag says which)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id={run_id}",
        f"--rdzv-conf=is_host={'1' if node == 0 else '0'},join_timeout=120",
        "--max-restarts=0",
        __file__, str(out), "--", *train_argv,
    ]  # fmt: skip


@pytest.mark.slow
def test_two_torchrun_nodes_train_what_one_process_trains(tmp_path: Path, corpus: Path) -> None:
    from ._dist import assert_same_run, probed_train
    from .conftest import tiny_config

    ref = probed_train(tiny_config(tmp_path / "one", corpus, steps=STEPS))
    run = tmp_path / "run"
    results = tmp_path / "results"
    results.mkdir()
    argv = ["train", "glm-tiny", "--data", str(corpus), "-o", str(run), "--ep", "2", *TRAIN_ARGS]
    port = _free_port()
    # One thread per rank: two ranks share two cores; OpenMP spin-waits would collapse throughput.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            _launcher(node, port, f"glmc-{port}", results, argv),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(NODES)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for node, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"node {node} exited {p.returncode}:\n{log[-4000:]}"
    reported = {}
    for f in sorted(results.glob("rank-*.pkl")):
        with f.open("rb") as fh:
            rank, status, a, b = pickle.load(fh)
        reported[rank] = (status, a, b)
    worst = assert_same_run(reported, ref, NODES)
    print(f"two torchrun nodes vs one process: largest relative differences {worst}")
    # The CLI's own record of the run: rank 0 wrote one line per step, with the same losses.
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in recs] == reported[0][1]
    ckpt = run / "checkpoints" / f"step-{STEPS:06d}"
    assert sorted(f.name for f in ckpt.iterdir()) == [
        "rank-00000.safetensors",
        "rank-00001.safetensors",
        "trainer.json",
    ]


def _worker(out: Path, argv: list[str]) -> int:
    """One rank under torchrun: `glmc train` (the CLI entry) under the probe; its record goes to
    `out/rank-R.pkl` whatever happens, so the test reports a rank's error rather than a timeout."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: `train._dist`, as pytest
    import glmc.train as package
    from glmc.cli import main
    from train._dist import Probe, ResultFile  # type: ignore[import-not-found]

    rank = int(os.environ["RANK"])
    sink = ResultFile(out / f"rank-{rank}.pkl")
    records: list[dict[str, Any]] = []
    original = package.train

    def keep(cfg: Any) -> Any:
        result = original(cfg)
        records.extend(result.records)
        return result

    try:
        package.train = keep  # `glmc train` calls glmc.train.train; keep its per-step records
        try:
            with Probe() as probe:
                code = main(argv)
        finally:
            package.train = original
        if code != 0:
            sink.put((rank, "error", f"glmc train exited {code}", ""))
            return code
        run = probe.run(records)
        sink.put((rank, "ok", run.losses, run))
        return 0
    except BaseException as e:
        sink.put((rank, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        raise


if __name__ == "__main__":
    split = sys.argv.index("--")
    raise SystemExit(_worker(Path(sys.argv[1]), sys.argv[split + 1 :]))
