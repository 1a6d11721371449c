"""A training plan at full scale on one CPU process, without allocating the model:
`glmc train SPEC --pipeline P --dry-run [--world N] [--device-memory 141GiB]`.

For each distinct rank role of the plan (`roles`: a pipeline stage, and within a stage the
ranks whose pieces differ in size, as a load-aware expert map could make them; ranks that
differ only in which equal piece they hold are one role), this process becomes that role's
first rank in torch's fake process group of N ranks (`FakeStore` + backend "fake": every
collective returns at once and moves nothing), then does what `glmc train` does on that rank:

- the model is built on the meta device and placed by the trainer's own entry points
  (`glmc.train.parallel.parallelize`, or `pipeline_parallel.pipeline_module` under pp), so the
  pieces held are exactly the run's: FSDP2 chunks, TP DTensors, expert slots;
- the meta tensors become fake tensors (`FakeTensorMode`: shapes, dtypes, devices, no storage),
  the trainer's optimizers are built and given their state (one optimizer step on zero
  gradients), and one training step runs under torch's `MemTracker`: every micro-batch's
  forward (bf16 autocast, as on a GPU, unless `--dtype fp32`) and backward, the gradient
  reductions, the loss-free bias update and the optimizer step. Clipping is left out: it reads
  the gradient norm's value, which fake tensors do not have, and scales in place.

Reported per role: the bytes of parameters (with the persistent buffers the IR counts as
parameters, the router's correction bias), gradients and optimizer state this rank holds,
summed over its local pieces, next to the IR's prediction for its stage (`glmc.ir.memory`,
with `TrainingAssumptions.glmc_train`: what `glmc inspect --pipeline P --train --json`
prints); the step's peak of all live tensors and the activations' share of it
(everything at the peak that is not a parameter, buffer, gradient or optimizer state: activations,
autograd temporaries, FSDP2's gathered weights); and whether the peak fits `device_memory`.

What fake tensors cannot know, the dry run assumes and says: routing is balanced (every
integer vector an expert layer reads back to size its all-to-all splits its T·k rows evenly
over its entries); the pipeline schedule's warm-up vote is answered locally (a fake receive
delivers nothing); blocks run eagerly (a compiled block usually holds less). Peak RSS and wall
time of the whole dry run are reported; nothing of the model's size is ever allocated.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from glmc.errors import GlmcError
from glmc.ir import MESH_AXES, Graph, mesh_of, shard_specs, stage_of
from glmc.train.config import TrainConfig

PARAM_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes")


@dataclass(frozen=True)
class Role:
    """Ranks that hold pieces of the same sizes: one pipeline stage, one expert-slot count per
    MoE layer. `rank` is the first of them, the one holding FSDP2's first chunks (the most)."""

    stage: int
    rank: int
    coords: dict[str, int]
    ranks: int  # how many ranks play this role
    slots: tuple[int, ...] = ()  # expert slots this role holds per MoE layer with an index map

    def describe(self) -> str:
        extra = f", expert slots {sorted(set(self.slots))}" if len(set(self.slots)) > 1 else ""
        return f"stage {self.stage}{extra}"


@dataclass
class RoleReport:
    role: Role
    layers: list[int] = field(default_factory=list)
    mtp: bool = False
    built: bool = False
    note: str = ""  # why the role was not built, when it was not
    measured: dict[str, int] = field(default_factory=dict)
    ir: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def equal(self) -> bool:
        return self.built and all(self.measured[k] == self.ir[k] for k in PARAM_KEYS)

    def fits(self, device_memory: int | None) -> bool | None:
        if device_memory is None or not self.built:
            return None
        return self.measured["peak_bytes"] <= device_memory

    def as_dict(self, device_memory: int | None) -> dict[str, Any]:
        r = self.role
        return {
            "role": r.describe(),
            "stage": r.stage,
            "layers": self.layers,
            "mtp": self.mtp,
            "rank": r.rank,
            "coords": r.coords,
            "ranks": r.ranks,
            "built": self.built,
            "note": self.note,
            "measured": self.measured,
            "ir": self.ir,
            "equal": self.equal,
            "fits": self.fits(device_memory),
            "seconds": round(self.seconds, 2),
        }


# --- roles -------------------------------------------------------------------------------------


def roles(graph: Graph) -> list[Role]:
    """The distinct rank roles of the graph's plan, in rank order of their first rank.

    A rank's pieces follow from its coordinates on the axes its ShardSpecs name; segment splits
    are even, so only index maps (load-aware expert placement) can give ranks of one stage
    pieces of different sizes. Only the pp axis and the axes of index maps are enumerated,
    never the whole world."""
    mesh = mesh_of(graph)
    index_specs: list[tuple[int, str, tuple[tuple[int, ...], ...]]] = []
    seen: set[tuple[int, str, tuple[tuple[int, ...], ...]]] = set()
    for n in graph.nodes:
        for p in n.params:
            for s in shard_specs(p):
                # Layers may share one map (the pass's contiguous placement): once per stage.
                key = (stage_of(n), s.axis, s.index)
                if s.index and key not in seen:
                    seen.add(key)
                    index_specs.append(key)
    axes = ["pp", *sorted({a for _, a, _ in index_specs}, key=MESH_AXES.index)]
    others = 1
    for a in MESH_AXES:
        if a not in axes:
            others *= mesh[a]
    found: dict[tuple[int, tuple[int, ...]], Role] = {}
    for combo in itertools.product(*(range(mesh[a]) for a in axes)):
        coords = dict.fromkeys(MESH_AXES, 0) | dict(zip(axes, combo, strict=True))
        stage = coords["pp"]
        slots = tuple(len(idx[coords[a]]) for s, a, idx in index_specs if s == stage)
        role = (stage, slots)
        if role in found:
            r = found[role]
            found[role] = replace(r, ranks=r.ranks + others)
            continue
        found[role] = Role(stage, _rank_of(coords, mesh), coords, others, slots)
    return sorted(found.values(), key=lambda r: r.rank)


def _rank_of(coords: dict[str, int], mesh: dict[str, int]) -> int:
    """Row-major over (pp, dp, ep, tp), tp innermost: the layout of the trainer's DeviceMesh."""
    rank = 0
    for a in MESH_AXES:
        rank = rank * mesh[a] + coords[a]
    return rank


# --- fake process group and fake tensors -------------------------------------------------------


@contextlib.contextmanager
def fake_world(rank: int, world: int) -> Iterator[None]:
    """This process as `rank` of `world` in torch's fake process group, with the environment
    torchrun would give that rank (restored afterwards)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise GlmcError("a dry-run role runs in a process of its own; a process group is already running")
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    # LOCAL_WORLD_SIZE 1: the trainer's setup must not divide this machine's threads among N ranks.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class FakeStepAssumptions(TorchDispatchMode):
    """What a step on fake tensors needs answered about values, entered above FakeTensorMode.

    - Balanced routing: while an expert layer runs (`rows` = its T·k (token, expert) pairs),
      an integer vector it reads back to the host (`tolist`: per element `item`, after
      `unbind`) holds T·k split as evenly as its length allows; these sizes are the all-to-all
      splits, so the exchanged buffers get the sizes balanced routing gives them.
    - Small real tensors stay real: an op whose tensor inputs are all real (buffers the placed
      modules hold, such as an expert-slot table) runs on them, so reading their values back
      works. Ops on fake tensors, and factories, stay fake."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: int | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
        from torch.utils._pytree import tree_leaves

        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) or t.is_meta for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if func is torch.ops.aten.unbind.int and self.rows is not None:
            src = args[0]
            if src.dim() == 1 and not (src.is_floating_point() or src.is_complex()) and out:
                q, r = divmod(self.rows, len(out))
                for i, e in enumerate(out):
                    e.item_memo = q + (1 if i < r else 0)  # FakeTensor.item() answers this
        return out


def _count_rows(module: nn.Module, mode: FakeStepAssumptions) -> list[Any]:
    """Hooks giving `mode` the (token, expert) pairs of each expert layer while it runs."""
    from glmc.export.torch.ep import ShardedExperts

    def enter(m: nn.Module, args: tuple[Any, ...]) -> None:
        mode.rows = int(args[1].numel())  # ids [T, k]

    def leave(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        mode.rows = None

    hooks = []
    for m in module.modules():
        if isinstance(m, ShardedExperts):
            hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    return hooks


def _materialize(module: nn.Module) -> None:
    """Meta tensors -> fake CPU tensors of the same shapes (inside FakeTensorMode); real
    tensors stay as they are. FSDP2's own `_apply` re-points its sharded parameters."""
    module._apply(lambda t: torch.empty_like(t, device="cpu") if t.is_meta else t)


# --- what a rank holds -------------------------------------------------------------------------


def _nbytes(t: Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def held_bytes(module: nn.Module, opts: list[torch.optim.Optimizer], ir_names: set[str]) -> dict[str, int]:
    """Bytes of this rank's local pieces: parameters (and the persistent buffers the IR counts
    as parameters), their gradients, every optimizer state tensor; other buffers apart."""
    params = list(module.parameters())
    param = sum(_nbytes(p) for p in params)
    counted = other = 0
    persistent = set(module.state_dict(keep_vars=True))
    for name, b in module.named_buffers():
        n = _nbytes(b)
        if name in persistent and _ir_name(name) in ir_names:
            counted += n
        else:
            other += n
    grads = sum(_nbytes(p.grad) for p in params if p.grad is not None)
    states = sum(
        _nbytes(v) for o in opts for s in o.state.values() for v in s.values() if isinstance(v, Tensor)
    )
    return {
        "param_bytes": param + counted,
        "grad_bytes": grads,
        "optimizer_bytes": states,
        "other_buffer_bytes": other,
    }


def _ir_name(name: str) -> str:
    return name.removeprefix("lm.")  # the training root wraps the emitted model as `lm`


# --- one role ----------------------------------------------------------------------------------


def run_role(
    role: Role, spec: Any, graph: Graph, cfg: TrainConfig, world: int, ir_stage: dict[str, Any]
) -> RoleReport:
    """Build, place and step `role`'s first rank on fake tensors; see the module docstring."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from glmc.api import ir_dtype
    from glmc.export.torch import build_model
    from glmc.pipeline import compile_graph
    from glmc.train.optim import build_optimizers
    from glmc.train.parallel import parallelize
    from glmc.train.pipeline_parallel import pipeline_module
    from glmc.train.plan import ParallelPlan, setup

    rep = RoleReport(role, layers=list(ir_stage["layers"]), mtp=bool(ir_stage["mtp_layers"]))
    rep.ir = {
        "param_bytes": ir_stage["param_bytes"],
        "grad_bytes": ir_stage["grad_bytes"],
        "optimizer_bytes": ir_stage["master_bytes"] + ir_stage["optimizer_bytes"],
    }
    t0 = time.perf_counter()
    plan = ParallelPlan.from_graph(graph)
    micro = cfg.batch_size // (plan.data_parallel * cfg.grad_accum)
    ir_names = {f"{n.name}.{p.name}" for n in graph.nodes for p in n.params}
    with fake_world(role.rank, world):
        d = setup(plan)
        # The trainer's model: the spec's own lowering in fp32 (build_torch), here on meta.
        lm = build_model(
            compile_graph(spec, dtype=ir_dtype(torch.float32)), dtype=torch.float32, device="meta"
        )
        lm.spec = spec
        lm.train()
        pipe = None
        if plan.pp > 1:
            module, pipe = pipeline_module(lm, graph, d, replace(cfg, compile=False), micro)
        else:
            module = parallelize(
                lm,
                graph,
                d,
                compile=False,
                activation_checkpoint=cfg.activation_checkpoint,
                fsdp=cfg.fsdp,
            )
        assumptions = FakeStepAssumptions()
        hooks = _count_rows(module, assumptions)
        with FakeTensorMode(allow_non_fake_inputs=True):
            _materialize(module)
            opts = build_optimizers(module, cfg)
            _prime_optimizers(module, opts)
            tracker = PeakTracker()
            tracker.track_external(module, *opts)
            with tracker, assumptions:
                _step(module, pipe, opts, d, cfg, spec, micro)
            measured = held_bytes(module, opts, ir_names)
            peak = tracker.get_tracker_snapshot("peak")
        for h in hooks:
            h.remove()
    rep.measured = measured | _peak(peak)
    rep.built = True
    rep.seconds = time.perf_counter() - t0
    return rep


class PeakTracker(MemTracker):
    """torch's MemTracker keeping only the global peak (its per-module peaks walk every module
    seen so far on every op, which at GLM-4.5's thousands of modules dominates the dry run),
    and taking the root module's forward once per micro-batch (MemTracker refuses a root
    called again: it tracks one iteration, and a step here runs grad_accum of them)."""

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                del self.memory_tracking[module]  # the next micro-batch: track it afresh
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


def _prime_optimizers(module: nn.Module, opts: list[torch.optim.Optimizer]) -> None:
    """Give the optimizers the state a run holds from its second step on: one step on zero
    gradients (fake: no values), then no gradients, as the trainer leaves them between steps."""
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)


def _autocast(cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    """The GPU run's autocast: bf16 unless the run asks for fp32 (CPU autocast, same dtypes)."""
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _step(
    module: nn.Module,
    pipe: Any,
    opts: list[torch.optim.Optimizer],
    d: Any,
    cfg: TrainConfig,
    spec: Any,
    micro: int,
) -> None:
    """The trainer's optimizer step (glmc/train/trainer.py), less the norm clipping and the
    metrics (both read values)."""
    from glmc.train import balance
    from glmc.train.parallel import sync_grads
    from glmc.train.trainer import micro_batch_backward

    accum = cfg.grad_accum
    ids = torch.randint(0, spec.vocab_size, (micro * accum, cfg.seq_len))
    labels = torch.randint(0, spec.vocab_size, (micro * accum, cfg.seq_len))
    top_k = spec.moe.top_k if spec.moe is not None else 1
    if pipe is not None:
        _answer_pipeline_vote(pipe.schedule)
        pipe.step(ids, labels, _autocast(cfg))
    else:
        for m in range(accum):
            part = slice(m * micro, (m + 1) * micro)
            micro_batch_backward(module, ids[part], labels[part], cfg, top_k, m, _autocast(cfg))
    sync_grads(module, d, cfg.fsdp)
    if pipe is not None:
        pipe.sync_grads()
    rs = balance.routers(module)
    if rs:
        counts = balance.global_counts(rs, d.dp_group, reduce=d.plan.data_parallel > 1)
        balance.update_bias(rs, counts, cfg.bias_update_rate)
    for o in opts:
        o.step()


def _answer_pipeline_vote(schedule: Any) -> None:
    """The schedule's first step runs a warm-up vote over the pipeline (torch 2.13's
    `_warmup_p2p`: every stage votes STATIC when it was given its input and output shapes, and
    the product travels stage to stage by send/recv). A fake receive delivers nothing, so the
    vote is answered here as the run answers it: every rank builds its stage with the same code
    (`pipeline_module` passes both shapes), so every stage votes as this one does."""
    from torch.distributed.pipelining._utils import InferenceMode

    def vote(stages: list[Any], has_backward: bool, p2p_done: bool) -> None:
        for stage in stages:
            dynamic = InferenceMode.needs_dynamic(stage._user_meta, has_backward)
            stage._inference_mode = InferenceMode.DYNAMIC if dynamic else InferenceMode.STATIC

    if not hasattr(schedule, "_warmup_p2p"):
        raise GlmcError("--dry-run: this torch's pipeline schedule has no warm-up vote to answer")
    schedule._warmup_p2p = vote


def _peak(snapshot: dict[Any, dict[Any, int]]) -> dict[str, int]:
    """The step's peak over all live tensors, and the part of it that is not training state."""
    total = state = 0
    for per_device in snapshot.values():
        for kind, n in per_device.items():
            name = getattr(kind, "value", kind)
            if name == "Total":
                total += n
            elif name in ("Parameter", "Buffer", "Gradient", "Optstate"):
                state += n
    return {"peak_bytes": total, "activation_peak_bytes": total - state}


# --- the whole plan ----------------------------------------------------------------------------


@dataclass
class DryRun:
    name: str
    pipeline: str
    mesh: dict[str, int]
    world: int
    seq_len: int
    micro_batch: int
    microbatches: int
    dtype: str
    device_memory: int | None
    reports: list[RoleReport]
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def equal(self) -> bool:
        return all(r.equal for r in self.reports if r.built)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pipeline": self.pipeline,
            "mesh": self.mesh,
            "world_size": self.world,
            "seq_len": self.seq_len,
            "micro_batch": self.micro_batch,
            "microbatches": self.microbatches,
            "activations": self.dtype,
            "device_memory": self.device_memory,
            "assumptions": "balanced routing; eager blocks; clipping not run",
            "roles": [r.as_dict(self.device_memory) for r in self.reports],
            "ir_equal": self.equal,
            "seconds": round(self.seconds, 2),
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def dry_run(cfg: TrainConfig, world: int | None = None, device_memory: int | None = None) -> DryRun:
    """Every role of `cfg`'s plan on fake tensors (module docstring). `world` defaults to the
    plan's world size; another value is refused by the shard pass's launch check, as
    `glmc train` under a launch of that size would be."""
    from glmc.api import resolve_spec
    from glmc.ir import TrainingAssumptions, per_rank_memory
    from glmc.passes.shard import check_launch
    from glmc.pipeline import compile_graph
    from glmc.train.pipeline_parallel import check_microbatches
    from glmc.train.plan import ParallelPlan, plan_pipeline
    from glmc.train.trainer import check_trainable, micro_batch_size

    t0 = time.perf_counter()
    if world is not None and (not isinstance(world, int) or world < 1):
        raise GlmcError(f"--world must be a positive integer, got {world!r}")
    if device_memory is not None and device_memory <= 0:
        raise GlmcError(f"--device-memory must be positive, got {device_memory!r}")
    spec = resolve_spec(cfg.spec)
    pipeline = plan_pipeline(cfg.pipeline, dp=cfg.dp, ep=cfg.ep, tp=cfg.tp, pp=cfg.pp, world=world or 1)
    graph = compile_graph(spec, pipeline)
    mesh = mesh_of(graph)
    plan_world = mesh["pp"] * mesh["dp"] * mesh["ep"] * mesh["tp"]
    world = plan_world if world is None else world
    check_launch(graph, world)  # the pass's message, naming the degrees, as glmc train's
    check_trainable(graph)
    plan = ParallelPlan.from_graph(graph)
    check_microbatches(cfg.grad_accum, plan.pp)
    micro = micro_batch_size(cfg, plan.data_parallel)
    memory = per_rank_memory(graph, TrainingAssumptions.glmc_train(cfg.optimizer, cfg.fsdp))
    reports = [
        _in_child(role, spec, graph, cfg, world, memory["stages"][role.stage]) for role in roles(graph)
    ]
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return DryRun(
        name=spec.name,
        pipeline=pipeline or "",
        mesh=mesh,
        world=world,
        seq_len=cfg.seq_len,
        micro_batch=micro,
        microbatches=cfg.grad_accum,
        dtype="fp32" if cfg.dtype == "fp32" else "bf16 autocast",
        device_memory=device_memory,
        reports=reports,
        seconds=time.perf_counter() - t0,
        peak_rss_bytes=max(children, own) * 1024,  # ru_maxrss is in KiB on Linux
    )


# --- one process per role ----------------------------------------------------------------------


def _in_child(
    role: Role, spec: Any, graph: Graph, cfg: TrainConfig, world: int, ir_stage: dict[str, Any]
) -> RoleReport:
    """`run_role` in a process of its own (`python -m glmc.train.dryrun`), as one rank per
    process in a run: the fake process group, its DeviceMesh (torch caches meshes and their
    groups per process) and every other global a rank sets up start fresh, and the role's memory
    goes back to the system when it ends. Arguments and result travel as pickles between this
    process and its child through a private temporary folder; nothing a user supplied is
    unpickled."""
    with tempfile.TemporaryDirectory(prefix="glmc-dryrun-") as tmp:
        job, out = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((role, spec, graph, cfg, world, ir_stage)))
        proc = subprocess.run(
            [sys.executable, "-m", "glmc.train.dryrun", str(job), str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        if not out.is_file():
            raise RuntimeError(
                f"dry run of {role.describe()} (rank {role.rank}) exited {proc.returncode}:\n{proc.stderr[-4000:]}"
            )
        status, value = pickle.loads(out.read_bytes())
    if status == "glmc-error":
        raise GlmcError(value)
    if status != "ok":
        raise RuntimeError(f"dry run of {role.describe()} (rank {role.rank}) failed:\n{value}")
    assert isinstance(value, RoleReport)
    return value


def _child(job: Path, out: Path) -> None:
    import traceback
    import warnings

    # FSDP2 and FakeTensor warn about data pointers of fake tensors; there are none to read.
    warnings.filterwarnings("ignore")
    args = pickle.loads(job.read_bytes())
    try:
        result: tuple[str, Any] = ("ok", run_role(*args))
    except GlmcError as e:
        result = ("glmc-error", str(e))
    except Exception:
        result = ("error", traceback.format_exc())
    out.write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    # Through the package's module, not __main__: the result's classes must be the ones the
    # parent unpickles (glmc.train.dryrun.RoleReport).
    from glmc.train import dryrun

    dryrun._child(Path(sys.argv[1]), Path(sys.argv[2]))
