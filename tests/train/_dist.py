"""Multi-process tests: run `glmc.train.train` (or any worker) in N gloo processes, bounded in time,
and compare what they trained with one process.

- Rendezvous: a `FileStore` in a fresh temporary folder, so no TCP port is picked and then bound
  later by someone else (the race of "find a free port, hand it to the children"). Each rank
  joins the default process group itself with a collective `timeout`, then calls the trainer,
  whose `setup` finds the group initialised (the env:// path is covered by the torchrun test).
- Bounds: a collective that waits longer than `COLLECTIVE_TIMEOUT_S` raises in its rank; the
  whole run is killed after `timeout_s` (each rank leads its own process group, killed with
  everything it started) and `spawn` raises `SpawnTimeoutError`. A hung collective fails the test
  instead of hanging CI.
- Results travel as one pickle file per rank, not through a pipe a large result could fill.
- `Probe` fingerprints every parameter's full gradient before each optimizer step and every
  parameter's (and router bias's) full value after it, on every rank and on one process;
  `assert_same_run` is the one parity check every distributed test uses.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 120.0  # one collective; the slowest step of a test run takes seconds
RUN_TIMEOUT_S = 900.0  # one whole multi-process run (20 steps, 4 ranks on 2 shared cores)
ROUTER_BIAS = "e_score_correction_bias"

# --- spawning ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendezvous:
    store: str  # FileStore path, unique to one spawn
    timeout_s: float = COLLECTIVE_TIMEOUT_S


class SpawnTimeoutError(TimeoutError):
    """The run outlived its bound; its processes were killed. `results` holds what ranks reported."""

    def __init__(self, msg: str, results: dict[int, tuple[str, Any, Any]], pids: list[int]) -> None:
        super().__init__(msg)
        self.results, self.pids = results, pids


def join_world(rank: int, world: int, rdv: Rendezvous) -> None:
    """Become rank `rank` of `world` the way torchrun sets a rank up, and join the gloo group."""
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)  # a spawned process: nothing to restore
    store = dist.FileStore(rdv.store, world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=rdv.timeout_s)
    )


class ResultFile:
    """A rank's result channel: `put((rank, status, a, b))` pickles it to its own file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def put(self, item: tuple[int, str, Any, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(item, f)
        tmp.replace(self.path)  # a reader never sees half a result


def _entry(
    index: int, worker: Callable[..., None], world: int, rdv: Rendezvous, args: tuple, folder: Path
) -> None:
    os.setpgrp()  # the watchdog kills this rank and anything it started as one group
    worker(index, world, rdv, *args, ResultFile(folder / f"rank-{index}.pkl"))


def _kill(processes: list[Any]) -> None:
    for p in processes:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # the group _entry made (same id as the rank's)
            p.kill()
    for p in processes:
        p.join()


def spawn(
    worker: Callable[..., None],
    world: int,
    *args: Any,
    timeout_s: float = RUN_TIMEOUT_S,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> dict[int, tuple[str, Any, Any]]:
    """Run `worker(rank, world, rendezvous, *args, queue)` in `world` spawned processes; each puts
    one (rank, status, a, b) on its queue. Returns {rank: (status, a, b)} of the ranks that
    reported (a rank that crashed without reporting is missing). Raises `SpawnTimeoutError` when the
    run takes longer than `timeout_s`."""
    with tempfile.TemporaryDirectory(prefix="glmc-dist-") as tmp:
        folder = Path(tmp)
        rdv = Rendezvous(str(folder / "store"), collective_timeout_s)
        ctx = mp.start_processes(
            _entry, args=(worker, world, rdv, args, folder), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        timed_out = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                with contextlib.suppress(mp.ProcessRaisedException, mp.ProcessExitedException):
                    # A failed rank: join stops the others; its own report is in its file.
                    if ctx.join(timeout=min(left, 5.0), grace_period=5.0):
                        break
                    continue
                break
        finally:
            _kill(ctx.processes)
        out: dict[int, tuple[str, Any, Any]] = {}
        for rank in range(world):
            path = folder / f"rank-{rank}.pkl"
            if path.is_file():
                with path.open("rb") as f:
                    r, status, a, b = pickle.load(f)
                out[r] = (status, a, b)
        if timed_out:
            pids = [p.pid for p in ctx.processes]
            raise SpawnTimeoutError(
                f"{world}-process run still going after {timeout_s:.0f} s; killed ranks {pids} "
                f"(reported: {sorted(out)})",
                out,
                pids,
            )
        return out


# --- training under the probe ----------------------------------------------------------------


@contextlib.contextmanager
def hooked_optimizers(
    attach: Callable[[torch.nn.Module, Any, list[torch.optim.Optimizer]], None],
) -> Iterator[None]:
    """While entered, `attach(model, cfg, optimizers)` sees the optimizers the trainer builds
    (before the first step), e.g. to register step hooks on them."""
    import glmc.train.trainer as trainer

    original = trainer.build_optimizers

    def build(model: torch.nn.Module, cfg: Any) -> list[torch.optim.Optimizer]:
        opts = original(model, cfg)
        attach(model, cfg, opts)
        return opts

    trainer.build_optimizers = build
    try:
        yield
    finally:
        trainer.build_optimizers = original


@dataclass
class Run:
    """What one process trained: its records and, when probed, its fingerprints."""

    records: list[dict[str, Any]]
    grads: list[dict[str, tuple[float, float]]] = field(
        default_factory=list
    )  # per step: name -> (norm, proj)
    weights: list[dict[str, tuple[float, float]]] = field(default_factory=list)  # after each step
    final: dict[str, torch.Tensor] = field(default_factory=dict)  # full tensors after the last step (rank 0)

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]


def _direction(name: str, shape: torch.Size) -> torch.Tensor:
    """A fixed random direction per tensor name: the projection catches sign, permutation and
    per-slice errors a norm alone would miss."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g, dtype=torch.float64)


class Probe:
    """While entered, the trainer's optimizers carry two hooks (its `build_optimizers` is wrapped):
    before the first optimizer steps, every parameter's full gradient (after the gradient sync,
    clipping and the bias update) is fingerprinted; after the last one steps, every parameter's and
    router bias's full value. "Full" undoes the plan: DTensor shards (FSDP2, TP) are gathered,
    expert slices reassembled from the ep/tp ranks by the pass's ShardSpecs; replicated tensors are this rank's
    copy, so a replica that was not synchronised shows up as a rank that disagrees."""

    def __init__(self) -> None:
        self.grads: list[dict[str, tuple[float, float]]] = []
        self.weights: list[dict[str, tuple[float, float]]] = []
        self.final: dict[str, torch.Tensor] = {}
        self._directions: dict[str, torch.Tensor] = {}

    def __enter__(self) -> Probe:
        self._hooks = hooked_optimizers(self._attach)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def _fingerprint(self, name: str, t: torch.Tensor) -> tuple[float, float]:
        t = t.detach().double()
        if name not in self._directions:
            self._directions[name] = _direction(name, t.shape)
        return float(t.norm()), float((t * self._directions[name]).sum())

    def _attach(self, model: torch.nn.Module, cfg: Any, opts: list[torch.optim.Optimizer]) -> None:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        from glmc.export.torch.ep import ShardedExperts

        pieces = {
            id(p): p.glmc_piece
            for m in model.modules()
            if isinstance(m, ShardedExperts)
            for p in m.parameters()
        }
        params = list(model.named_parameters())
        biases = [(n, b) for n, b in model.named_buffers() if n.endswith(ROUTER_BIAS)]
        rank0 = not dist.is_initialized() or dist.get_rank() == 0

        def full(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            piece = pieces.get(id(p))
            if (
                piece is not None
            ):  # this rank's expert slots (and tp columns): gathered as the pass split them
                return piece.full(t)
            return t.full_tensor() if isinstance(t, DTensor) else t

        @torch.no_grad()
        def before(opt: Any, args: Any, kwargs: Any) -> None:
            grads = {}
            for n, p in params:
                assert p.grad is not None, f"{n} has no gradient at step {len(self.grads) + 1}"
                grads[n] = self._fingerprint(n, full(p, p.grad))
            self.grads.append(grads)

        @torch.no_grad()
        def after(opt: Any, args: Any, kwargs: Any) -> None:
            values = [(n, full(p, p.detach())) for n, p in params]
            values += [(n, b) for n, b in biases]
            self.weights.append({n: self._fingerprint(n, v) for n, v in values})
            if len(self.weights) == cfg.steps and rank0:
                self.final = {n: v.detach().clone() for n, v in values}

        opts[0].register_step_pre_hook(before)
        opts[-1].register_step_post_hook(after)

    def run(self, records: list[dict[str, Any]]) -> Run:
        assert len(self.grads) == len(self.weights) == len(records), "the probe missed optimizer steps"
        return Run(records, self.grads, self.weights, self.final)


def probed_train(cfg: Any) -> Run:
    """One process: `train(cfg)` under the probe."""
    from glmc.train import train

    with Probe() as probe:
        result = train(cfg)
    return probe.run(result.records)


def train_worker(rank: int, world: int, rdv: Rendezvous, cfg: Any, probe: bool, queue: Any) -> None:
    try:
        join_world(rank, world, rdv)
        from glmc.train import train

        with Probe() if probe else contextlib.nullcontext() as p:
            result = train(cfg)
        run = p.run(result.records) if isinstance(p, Probe) else Run(result.records)
        queue.put((rank, "ok", run.losses, run))
    except BaseException as e:
        queue.put((rank, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        raise


def run_distributed(cfg: Any, world: int = 2, probe: bool = False) -> dict[int, tuple[str, Any, Any]]:
    """{rank: ("ok", losses, Run) | ("error", message, traceback)}."""
    return spawn(train_worker, world, cfg, probe)


def _local_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def held_bytes(model: torch.nn.Module, opts: list[torch.optim.Optimizer]) -> dict[str, int]:
    """What this rank holds, summed over its local pieces: parameters and the router biases
    (persistent buffers the IR counts as parameters), and every optimizer state tensor."""
    params = sum(_local_bytes(p) for p in model.parameters())
    params += sum(_local_bytes(b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    optim = sum(
        _local_bytes(v) for o in opts for st in o.state.values() for v in st.values() if torch.is_tensor(v)
    )
    return {"param_bytes": params, "optimizer_bytes": optim}


def bytes_worker(rank: int, world: int, rdv: Rendezvous, cfg: Any, probe: type[Probe], queue: Any) -> None:
    """Trains under `probe`; reports ("ok", the bytes this rank holds after its first optimizer
    step, the probed Run) or ("error", message, traceback)."""
    try:
        join_world(rank, world, rdv)
        from glmc.train import train

        held: dict[str, int] = {}

        def attach(model: torch.nn.Module, cfg: Any, opts: list[torch.optim.Optimizer]) -> None:
            def after(*_: Any) -> None:  # the last optimizer has stepped: every state exists
                held.update(held or held_bytes(model, opts))

            opts[-1].register_step_post_hook(after)

        with probe() as p, hooked_optimizers(attach):
            result = train(cfg)
        queue.put((rank, "ok", held, p.run(result.records)))
    except BaseException as e:
        queue.put((rank, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        raise


def assert_resume_is_exact(cfg: Callable[..., Any], world: int) -> dict[int, tuple[str, Any, Any]]:
    """`cfg(name, **changes)`: a 6-step run saving every 3 steps into a folder named `name`.
    The run resumed from step 3 reproduces the uninterrupted run on every rank: its losses and
    its final checkpoint's weights (experts included), bit for bit. Returns the full run."""
    from glmc.train.checkpoint import read_model_state

    full = run_distributed(cfg("full"), world)
    for rank in range(world):
        assert full[rank][0] == "ok", full[rank]
    checkpoints = Path(cfg("full").out) / "checkpoints"
    resumed = run_distributed(cfg("resumed", resume=str(checkpoints / "step-000003")), world)
    for rank in range(world):
        assert resumed[rank][0] == "ok", resumed[rank]
        assert resumed[rank][1] == full[rank][1][3:]  # the uninterrupted run's losses, bit for bit
    a = read_model_state(checkpoints / "step-000006")
    b = read_model_state(Path(cfg("resumed").out) / "checkpoints" / "step-000006")
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    return full


# --- the parity check -------------------------------------------------------------------------


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _compare_prints(
    what: str,
    step: int,
    got: dict[str, tuple[float, float]],
    ref: dict[str, tuple[float, float]],
    rtol: float,
) -> float:
    """One step's tensors: the norms within `rtol` relative, the projections within `rtol` of the
    norm (a projection on a random direction is of the norm's size). Fails naming the tensor that
    is furthest off (clipping spreads one group's error thinly over all the others). Returns the
    worst ratio to `rtol` seen (< 1 passes)."""
    assert got.keys() == ref.keys(), (
        f"{what} at step {step}: tensors {sorted(got.keys() ^ ref.keys())} differ"
    )
    diffs = {}
    for name, (rn, rp) in ref.items():
        gn, gp = got[name]
        diffs[name] = (_rel(gn, rn), abs(gp - rp) / max(rn, 1e-30))
    name = max(diffs, key=lambda n: max(diffs[n]))
    dn, dp = diffs[name]
    (gn, gp), (rn, rp) = got[name], ref[name]
    assert dn < rtol and dp < rtol, (
        f"{what} of {name} at step {step}: norm {gn:.6g} vs {rn:.6g} (relative {dn:.2e}), "
        f"projection {gp:.6g} vs {rp:.6g} ({dp:.2e} of the norm); tolerance {rtol:.0e}"
    )
    return max(dn, dp) / rtol


@dataclass(frozen=True)
class Tolerances:
    """Relative tolerances of a parity check. The defaults hold an fp32 eager Muon run on 1-4 gloo
    ranks against one process (measured over 10 steps: losses 2e-7, gradients 5e-6, weights 4e-6
    apart, replicas identical); a factor of 2 in any gradient (e.g. a reduction summed instead of
    averaged over dp=2) is off by 0.5-1.0."""

    loss: float = 1e-5
    grad: float = 1e-4
    weight: float = 1e-5
    replica: float = 1e-6  # copies of one tensor on different ranks


def assert_same_run(
    results: dict[int, tuple[str, Any, Any]], ref: Run, world: int, tol: Tolerances = Tolerances()
) -> dict[str, float]:
    """Every rank ran, and trained what one process trained: per step the losses, the global
    gradient norm and the expert loads; per step and parameter the gradient and the updated
    value (fingerprints); at the end every weight and router bias, elementwise. Replicated
    tensors agree between ranks. Returns the largest relative differences seen (for the log)."""
    assert sorted(results) == list(range(world)), (
        f"ranks that reported: {sorted(results)} of {world}: {results}"
    )
    for rank, (status, a, b) in results.items():
        assert status == "ok", f"rank {rank}: {a}\n{b}"
    worst = {"loss": 0.0, "grad": 0.0, "weight": 0.0, "replica": 0.0}
    runs: dict[int, Run] = {rank: b for rank, (_, _, b) in results.items()}
    steps = len(ref.records)
    assert ref.grads and all(len(r.grads) == steps for r in runs.values()), "run with probe=True"
    for rank, run in runs.items():
        assert len(run.records) == steps, (rank, len(run.records), steps)
    # Step by step, so the first failure is the earliest, and per parameter before the aggregates.
    for i in range(steps):
        step = i + 1
        for rank, run in runs.items():
            # Gradients after the sync and clipping: a reduction missing or off by a factor in any
            # parameter group shows here at step 1, naming the parameter.
            seen = _compare_prints(f"rank {rank}: gradient", step, run.grads[i], ref.grads[i], tol.grad)
            worst["grad"] = max(worst["grad"], tol.grad * seen)
            x, y = run.records[i], ref.records[i]
            for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm"):
                if y[key] is None:
                    assert x[key] is None, (rank, key, step)
                    continue
                d = _rel(x[key], y[key])
                worst["loss"] = max(worst["loss"], d)
                # grad_norm is the unclipped global norm: exact in scale, not damped by the optimizer.
                assert d < tol.loss, (
                    f"rank {rank} step {step}: {key} {x[key]!r} vs one process {y[key]!r} ({d:.2e})"
                )
            # Token counts are integers summed over the data-parallel ranks before the bias update.
            assert x["load_imbalance"] == y["load_imbalance"], (
                f"rank {rank} step {step}: expert load max/mean {x['load_imbalance']} vs one process "
                f"{y['load_imbalance']}"
            )
            seen = _compare_prints(f"rank {rank}: weight", step, run.weights[i], ref.weights[i], tol.weight)
            worst["weight"] = max(worst["weight"], tol.weight * seen)
        # Replicas: every rank assembled the same full tensors (a missing all-reduce leaves them apart).
        for rank in range(1, world):
            for what, got, base in (
                ("gradient", runs[rank].grads, runs[0].grads),
                ("weight", runs[rank].weights, runs[0].weights),
            ):
                seen = _compare_prints(
                    f"rank {rank} against rank 0: {what}", step, got[i], base[i], tol.replica
                )
                worst["replica"] = max(worst["replica"], tol.replica * seen)
    final = runs[0].final
    assert final.keys() == ref.final.keys() and final
    biases = [k for k in ref.final if k.endswith(ROUTER_BIAS)]
    assert biases and all(ref.final[k].abs().sum() > 0 for k in biases)  # loss-free balancing ran
    for k, v in ref.final.items():
        torch.testing.assert_close(
            final[k], v, rtol=tol.weight * 10, atol=tol.weight, msg=lambda m, k=k: f"final {k}: {m}"
        )
    return worst
