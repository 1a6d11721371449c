"""Training checkpoints in safetensors and JSON (nothing is ever unpickled), and the Hugging Face
export.

A checkpoint folder `out/checkpoints/step-NNNNNN/` holds exactly:

- `trainer.json`: format, step, world size, schedulers, config, the resolved spec, the data
  fingerprint, and every non-tensor leaf of the optimiser state (param_groups), flattened;
- `rank-RRRRR.safetensors`, one per rank: the tensors this rank owns, each the rank's local piece
  of a (possibly sharded) tensor. The header's `glmc` metadata (JSON) gives each piece's global
  shape and offset; the rank's RNG state is a uint8 tensor in the same file.

A piece is written once: a DTensor's local shard by the rank at coordinate 0 of every mesh
dimension the tensor is replicated over, a plain tensor (replicated on every rank) by rank 0.
Loading assembles each rank's local pieces from whichever files hold the overlapping regions,
so a checkpoint can be read back under another plan. torch.distributed.checkpoint is not used:
its `.metadata` file is a pickle and its loader unpickles non-tensor entries, so a crafted run
folder could run code. Any file other than the ones above (a planted `.metadata`, `*.pt`,
`*.distcp`) makes the whole checkpoint refused.

Expert-parallel weights are plain local tensors (one slice per EP rank); they are presented as
DTensors sharded over the EP mesh (replicated over edp), so the checkpoint holds the global
[E, ...] tensors. Written to a temporary folder, then renamed: a folder with this name is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from glmc.errors import CheckpointError, GlmcError
from glmc.export.hf import ST_TORCH
from glmc.train.parallel import expert_params, expert_views
from glmc.train.plan import Dist

FORMAT = "glmc-train-checkpoint/1"
TRAINER_FILE = "trainer.json"
_RANK_FILE = re.compile(r"rank-(\d{5})\.safetensors")
_STEP_DIR = re.compile(r"step-\d{6,}")
_META_KEY = "glmc"
RNG_CPU, RNG_CUDA = "rng/cpu", "rng/cuda"
# Files torch.save / torch.distributed.checkpoint write; named in the refusal so a planted pickle
# is recognised as one.
_PICKLE_NAMES = (".metadata",)
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".distcp")
# Optimiser param_group entries that say how the step runs on this plan (fused kernels need every
# parameter of one kind), not what it computes: they stay as built, the rest come from the file.
_EXECUTION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    schedulers: list[dict[str, Any]]
    config: dict[str, Any]
    data: dict[str, Any]  # fingerprint: tokenizer, seq_len, num_sequences, sha256 of the tokens
    spec: dict[str, Any] = field(default_factory=dict)  # the resolved ModelSpec, as JSON


@dataclass(frozen=True)
class _Piece:
    """One stored piece of a tensor: where it lies in the global tensor and which file holds it."""

    file: Path
    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: str


@dataclass
class Checkpoint:
    """A checkpoint folder whose bookkeeping and file headers were checked (no tensor read yet)."""

    path: Path
    state: TrainerState
    world: int
    values: dict[str, Any]  # non-tensor leaves of the optimiser state, by path
    pieces: dict[str, list[_Piece]]  # tensor path -> its stored pieces
    rng: dict[int, Path]  # rank -> the file holding its RNG state


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def latest(run_dir: Path) -> Path | None:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir())
    return done[-1] if done else None


# --- the state as (path, leaf) pairs -----------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Leaves of a model/optimiser state dict by '/'-joined path. Dicts and lists of dicts
    (param_groups) are walked; tensors and plain values (numbers, strings, lists of them) are
    leaves."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, Tensor)) for v in tree):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def _replace_leaves(tree: Any, new: dict[str, Any], prefix: str = "") -> Any:
    if isinstance(tree, dict):
        return {k: _replace_leaves(v, new, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, Tensor)) for v in tree):
        return type(tree)(_replace_leaves(v, new, f"{prefix}/{i}") for i, v in enumerate(tree))
    return new.get(prefix, tree)


def _expert_names(module: nn.Module) -> set[str]:
    ids = {id(p) for p in expert_params(module)}
    return {n for n, p in module.named_parameters() if id(p) in ids}


def _map_experts(sd: dict[str, Any], names: set[str], fn: Any) -> dict[str, Any]:
    """Model or optimiser state with `fn(name, tensor)` applied to the expert tensors."""

    def each(k: str, t: Any) -> Any:
        return fn(k, t) if isinstance(t, Tensor) and t.ndim >= 1 else t

    out: dict[str, Any] = {}
    for k, v in sd.items():
        if k in names:
            out[k] = each(k, v)
        elif k == "state" and isinstance(v, dict):  # optimiser state keyed by parameter name
            out[k] = {
                pk: ({sk: each(pk, sv) for sk, sv in pv.items()} if pk in names else pv)
                for pk, pv in v.items()
            }
        else:
            out[k] = v
    return out


def _unwrap(sd: dict[str, Any], views: dict[str, Any]) -> dict[str, Any]:
    """Loaded state with each expert tensor back to this rank's piece (parallel.ExpertView)."""
    names = set(views)
    return {k: _map_experts(v, names, lambda n, t: views[n].local(t)) for k, v in sd.items()}


def _sharded_state(module: nn.Module, opts: list[torch.optim.Optimizer], d: Dist) -> dict[str, Any]:
    """Model and optimiser state; expert tensors as their checkpoint view (parallel.ExpertView:
    the global [E, ...] tensors, sliced over ep or gathered)."""
    model_sd, optim_sd = get_state_dict(module, opts)
    views = expert_views(module, d)
    if views:
        names = set(views)
        model_sd = _map_experts(model_sd, names, lambda n, t: views[n].present(t))
        optim_sd = _map_experts(optim_sd, names, lambda n, t: views[n].present(t))
    return {"model": model_sd, "optim": optim_sd}


def _local_piece(
    t: Tensor, rank: int = 0, base: int = 0
) -> tuple[Tensor, tuple[int, ...], tuple[int, ...], bool]:
    """(local tensor, its offset in the global tensor, the global shape, whether this rank
    writes it).

    `base` is the first rank of this rank's pipeline stage (0 without pipeline parallel): a
    stage's tensors live on its ranks only. The writer of a DTensor piece is its first replica:
    coordinate 0 on every mesh dimension the tensor is replicated over, within the sub-mesh that
    holds `base` — a DTensor on a slice of the stage (FSDP2 over the dp ranks of one tp index)
    is replicated over the other slices. A plain tensor is replicated on every rank of the
    stage; `base` writes it. Loading checks that the pieces cover each tensor exactly once, so a
    wrong guess fails loudly."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        chunk = t.__create_chunk_list__()[0]
        mesh = t.device_mesh
        coord = mesh.get_coordinate()
        owner = (
            coord is not None
            and bool((mesh.mesh == base).any())
            and all(c == 0 for c, p in zip(coord, t.placements, strict=True) if p.is_replicate())
        )
        return t.to_local(), tuple(int(o) for o in chunk.offsets), tuple(t.shape), owner
    return t, (0,) * t.ndim, tuple(t.shape), rank == base


def _stage_base(d: Dist) -> int:
    """The first rank of this rank's pipeline stage (pp is the outermost mesh axis)."""
    return d.rank - d.rank % (d.world // d.plan.pp)


def _param_of(key: str) -> str | None:
    """The parameter a model or optimiser-state path belongs to (`model/NAME`, `optim/state/NAME/...`)."""
    parts = key.split("/")
    if parts[0] == "model" and len(parts) == 2:
        return parts[1]
    if parts[:2] == ["optim", "state"] and len(parts) > 2:
        return parts[2]
    return None


def _stage_values(values: dict[str, Any], d: Dist) -> dict[str, Any]:
    """Under pipeline parallel each stage's optimisers hold its own parameters: the groups'
    parameter lists are joined in stage order (= the one-process order, a copy counted once);
    every other entry (lr, betas, ...) is the same on every stage."""
    if d.plan.pp == 1:
        return values
    stages: list[dict[str, Any]] = [{} for _ in range(d.plan.pp)]
    dist.all_gather_object(stages, values, group=d.pp_group)
    out = dict(stages[0])
    for key in out:
        if key.endswith("/params"):
            joined: list[Any] = []
            for st in stages:
                joined += [n for n in st.get(key, []) if n not in joined]
            out[key] = joined
    return out


# --- saving ------------------------------------------------------------------------------------


def _write_rank_file(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)


def _agree(d: Dist, error: OSError | None, tmp: Path, final: Path) -> None:
    """Every rank learns whether any rank failed to write; then all stop together (rank 0
    removes the partial folder) instead of the others waiting for the failed one forever."""
    failed = error is not None
    if d.world > 1:
        flag = torch.tensor([int(failed)], device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = bool(flag.item())
    if not failed:
        return
    d.barrier()
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        raise GlmcError(f"cannot write the checkpoint {final}: another rank failed to write its part")
    why = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    raise GlmcError(
        f"cannot write the checkpoint {final}: {why} ({error.filename or tmp}); removed {tmp.name}"
    )


def save(
    run_dir: Path,
    module: nn.Module,
    opts: list[torch.optim.Optimizer],
    state: TrainerState,
    d: Dist,
    keep: int,
) -> Path:
    final = checkpoint_dir(run_dir, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    error: OSError | None = None
    if d.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    _agree(d, error, tmp, final)

    tensors: dict[str, Tensor] = {}
    pieces: dict[str, dict[str, list[int]]] = {}
    values: dict[str, Any] = {}
    base = _stage_base(d)
    # A pipeline's last stage holds the MTP layer's embedding as a copy (pipeline_parallel.py):
    # its owner on the first stage writes it, and a loading copy reads the owner's pieces.
    copies: frozenset[str] = getattr(module, "copy_names", frozenset())
    for key, leaf in _flatten(_sharded_state(module, opts, d)):
        if not isinstance(leaf, Tensor):
            values[key] = leaf
            continue
        local, offset, global_shape, owner = _local_piece(leaf, d.rank, base)
        if owner and _param_of(key) not in copies:
            # A copy: safetensors refuses tensors sharing storage (FSDP2 shards are views).
            tensors[key] = local.detach().to("cpu", copy=True).contiguous()
            pieces[key] = {"offset": list(offset), "global_shape": list(global_shape)}
    tensors[RNG_CPU] = torch.get_rng_state()
    if d.device.type == "cuda":
        tensors[RNG_CUDA] = torch.cuda.get_rng_state(d.device)
    meta = {_META_KEY: json.dumps({"format": FORMAT, "rank": d.rank, "world": d.world, "pieces": pieces})}
    values = _stage_values(values, d)
    try:
        _write_rank_file(tmp / rank_file(d.rank), tensors, meta)
        if d.is_main:
            body = {
                "format": FORMAT,
                "step": state.step,
                "world": d.world,
                "schedulers": state.schedulers,
                "config": state.config,
                "data": state.data,
                "spec": state.spec,
                "optimizer_values": values,
            }
            (tmp / TRAINER_FILE).write_text(json.dumps(body, indent=2, default=str) + "\n")
    except OSError as e:
        error = e
    _agree(d, error, tmp, final)
    if d.is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        old = sorted(p for p in final.parent.iterdir() if _STEP_DIR.fullmatch(p.name) and p != final)
        for p in old[: max(0, len(old) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    d.barrier()
    return final


# --- reading -----------------------------------------------------------------------------------


def _ints(v: Any, what: str, where: Path) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v
    ):
        raise CheckpointError(
            f"{where}: {what} is not a list of non-negative integers; the checkpoint is corrupt"
        )
    return tuple(v)


def _check_files(path: Path, world: int) -> None:
    expected = {TRAINER_FILE} | {rank_file(r) for r in range(world)}
    for f in sorted(path.iterdir()):
        if f.name in expected:
            continue
        if f.name in _PICKLE_NAMES or f.suffix in _PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{f}: a pickle-based file (torch.save / torch.distributed.checkpoint format) in a glmc "
                "checkpoint; glmc never unpickles files from a run folder (unpickling can run code), "
                "so this checkpoint is refused"
            )
        raise CheckpointError(
            f"{f}: unexpected in a glmc training checkpoint (it holds only {TRAINER_FILE} and "
            f"rank-NNNNN.safetensors); refusing it"
        )
    for r in range(world):
        if not (path / rank_file(r)).is_file():
            raise CheckpointError(f"{path / rank_file(r)}: missing; the checkpoint is incomplete")


def _read_trainer_file(path: Path) -> tuple[TrainerState, int, dict[str, Any]]:
    f = path / TRAINER_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: not a glmc training checkpoint (no {TRAINER_FILE})")
    try:
        body = json.loads(f.read_text())
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            found = body.get("format") if isinstance(body, dict) else None
            raise CheckpointError(
                f"{f}: format {found!r}, expected {FORMAT!r} (older glmc checkpoints used "
                "torch.distributed.checkpoint, whose pickled metadata glmc no longer loads)"
            )
        step, world, values = body["step"], body["world"], body["optimizer_values"]
        if not (isinstance(step, int) and step >= 0 and isinstance(world, int) and world >= 1):
            raise ValueError("step and world must be non-negative integers")
        if not isinstance(values, dict):
            raise TypeError("optimizer_values must be an object")
        state = TrainerState(
            step, list(body["schedulers"]), dict(body["config"]), dict(body["data"]), dict(body["spec"])
        )
        if not all(isinstance(s, dict) for s in state.schedulers):
            raise TypeError("schedulers must be objects")
        return state, world, values
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({e}); the checkpoint is corrupt") from None


def _read_header(f: Path, rank: int, world: int) -> tuple[list[_Piece], bool]:
    """The pieces a rank file holds (headers only; safetensors checks that the file covers every
    tensor, so a truncated file fails here) and whether it holds the RNG state."""
    try:
        with safe_open(str(f), framework="pt") as h:
            meta = json.loads((h.metadata() or {}).get(_META_KEY, "null"))
            keys = set(h.keys())
            info = {k: (tuple(h.get_slice(k).get_shape()), str(h.get_slice(k).get_dtype())) for k in keys}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({str(e)[:200]}); the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or meta.get("rank") != rank or meta.get("world") != world:
        raise CheckpointError(
            f"{f}: its header does not describe rank {rank} of {world}; the checkpoint is corrupt"
        )
    raw = meta.get("pieces")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f}: no piece table in its header; the checkpoint is corrupt")
    pieces = []
    for key, m in raw.items():
        if key not in info or not isinstance(m, dict):
            raise CheckpointError(f"{f}: {key} is listed but not stored; the checkpoint is corrupt")
        shape, dtype = info[key]
        offset = _ints(m.get("offset"), f"{key}'s offset", f)
        gshape = _ints(m.get("global_shape"), f"{key}'s global shape", f)
        if not (len(offset) == len(shape) == len(gshape)) or any(
            o + s > g for o, s, g in zip(offset, shape, gshape, strict=True)
        ):
            raise CheckpointError(
                f"{f}: {key} does not fit its global shape {list(gshape)}; the checkpoint is corrupt"
            )
        pieces.append(_Piece(f, key, offset, shape, gshape, dtype))
    extra = keys - set(raw) - {RNG_CPU, RNG_CUDA}
    if extra:
        raise CheckpointError(f"{f}: unlisted tensor {sorted(extra)[0]}; the checkpoint is corrupt")
    return pieces, RNG_CPU in keys


def open_checkpoint(path: Path) -> Checkpoint:
    """Check a checkpoint folder's files, bookkeeping and headers, before any weights are touched."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    state, world, values = _read_trainer_file(path)
    _check_files(path, world)
    pieces: dict[str, list[_Piece]] = {}
    rng: dict[int, Path] = {}
    for r in range(world):
        f = path / rank_file(r)
        found, has_rng = _read_header(f, r, world)
        for p in found:
            pieces.setdefault(p.key, []).append(p)
        if has_rng:
            rng[r] = f
    return Checkpoint(path, state, world, values, pieces, rng)


def read_trainer_state(path: Path) -> TrainerState:
    return open_checkpoint(path).state


# Settings that make a run what it is: resuming with another value would either be silently
# overridden by the checkpoint (learning rate, weight decay and betas live in the optimiser and
# scheduler state) or continue a different run (seed, batch and sequence length choose the data).
RUN_SETTINGS = {
    "seed": "--seed",
    "seq_len": "--seq-len",
    "batch_size": "--batch-size",
    "optimizer": "--optimizer",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "betas": "betas",
}


def _json(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            found = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
            if found:
                return found
        return None
    return None if a == b else (prefix, a, b)


def check_same_run(
    ck: Checkpoint, config: dict[str, Any], spec: dict[str, Any], data: dict[str, Any]
) -> None:
    """Refuse a checkpoint of another run (other spec, data or run settings), naming the difference."""
    theirs, ours = dict(ck.state.spec), dict(_json(spec))
    theirs.pop("name", None), ours.pop("name", None)  # a renamed copy of the same architecture
    diff = _first_difference(theirs, ours)
    if diff:
        raise CheckpointError(
            f"{ck.path}: written for another model (spec {diff[0]} is {diff[1]!r} there, {diff[2]!r} here)"
        )
    for key in ("tokenizer", "tokenizer_vocab", "sha256"):
        if ck.state.data.get(key) != data.get(key):
            raise CheckpointError(
                f"{ck.path}: written for other training data ({key} {ck.state.data.get(key)!r} there, "
                f"{data.get(key)!r} here; --data, --include, --exclude, --max-bytes and --tokenizer choose it)"
            )
    for key, flag in RUN_SETTINGS.items():
        before, now = ck.state.config.get(key), _json(config.get(key))
        if before != now:
            raise CheckpointError(
                f"{ck.path}: written with {flag} {before!r}, this run has {now!r}; resume with the same "
                "setting, or start a new run in another folder"
            )


def _region(
    offset: tuple[int, ...], shape: tuple[int, ...], lo: list[int], hi: list[int]
) -> tuple[slice, ...]:
    return tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset, strict=True))


def _fill(ck: Checkpoint, key: str, target: Tensor, files: dict[Path, Any]) -> None:
    """Copy the stored regions overlapping this rank's piece of `key` into it."""
    local, offset, gshape, _ = _local_piece(target)
    stored = ck.pieces.get(key)
    if not stored:
        raise CheckpointError(f"{ck.path}: holds no {key}; it was written for another model or optimiser")
    covered = 0
    for p in stored:
        if p.global_shape != gshape:
            raise CheckpointError(
                f"{ck.path}: {key} has shape {list(p.global_shape)} there, {list(gshape)} in this model; "
                "it was written for another model"
            )
        if ST_TORCH.get(p.dtype) != local.dtype:
            raise CheckpointError(
                f"{ck.path}: {key} is {p.dtype} there, {str(local.dtype).removeprefix('torch.')} in this run"
            )
        lo = [max(a, b) for a, b in zip(offset, p.offset, strict=True)]
        hi = [min(a + s, b + t) for a, s, b, t in zip(offset, local.shape, p.offset, p.shape, strict=True)]
        if any(a >= b for a, b in zip(lo, hi, strict=True)):
            continue
        h = files[p.file]
        src = h.get_slice(p.key)[_region(p.offset, p.shape, lo, hi)] if lo else h.get_tensor(p.key)
        with torch.no_grad():
            local[_region(offset, tuple(local.shape), lo, hi)].copy_(src)
        covered += math.prod(b - a for a, b in zip(lo, hi, strict=True))
    if covered != local.numel():
        how = "do not cover it" if covered < local.numel() else "overlap"
        raise CheckpointError(f"{ck.path}: the stored pieces of {key} {how}; the checkpoint is corrupt")


def _restored_values(ck: Checkpoint, targets: dict[str, Any], stage: bool = False) -> dict[str, Any]:
    """The checkpoint's non-tensor optimiser entries, typed like this run's (tuples stay tuples);
    execution flags keep this plan's values. `stage`: this rank holds one pipeline stage, whose
    groups hold a part of each stored group's parameters (in the stored order)."""
    out: dict[str, Any] = {}
    for key, now in targets.items():
        if key.rsplit("/", 1)[-1] in _EXECUTION_FLAGS:
            continue
        if key not in ck.values:
            raise CheckpointError(
                f"{ck.path}: holds no optimiser entry {key}; it was written for another optimiser"
            )
        v = ck.values[key]
        if (
            stage
            and key.endswith("/params")
            and isinstance(v, list)
            and [n for n in v if n in now] == list(now)
        ):
            v = now
        if key.endswith("/params") and v != now:
            raise CheckpointError(
                f"{ck.path}: optimiser group {key.removesuffix('/params')} holds other parameters there; "
                "it was written for another model or --optimizer"
            )
        out[key] = tuple(v) if isinstance(now, tuple) and isinstance(v, list) else v
    extra = sorted(set(ck.values) - set(targets))
    if extra:
        raise CheckpointError(f"{ck.path}: holds optimiser entry {extra[0]} this run does not have")
    return out


def load(ck: Checkpoint, module: nn.Module, opts: list[torch.optim.Optimizer], d: Dist) -> None:
    """Load weights, router biases and optimiser state in place; restore this rank's RNG."""
    state = _sharded_state(module, opts, d)
    leaves = dict(_flatten(state))
    tensor_keys = {k for k, v in leaves.items() if isinstance(v, Tensor)}
    known = set(tensor_keys)
    if d.plan.pp > 1:  # a stage holds its part: the pipeline holds the model
        stages: list[set[str]] = [set() for _ in range(d.plan.pp)]
        dist.all_gather_object(stages, tensor_keys, group=d.pp_group)
        known = set().union(*stages)
    extra = sorted(set(ck.pieces) - known)
    if extra:
        raise CheckpointError(f"{ck.path}: holds {extra[0]}, which this model and optimiser do not have")
    values = _restored_values(ck, {k: v for k, v in leaves.items() if k not in tensor_keys}, d.plan.pp > 1)
    with contextlib.ExitStack() as stack:
        try:
            files = {
                p.file: stack.enter_context(safe_open(str(p.file), framework="pt"))
                for ps in ck.pieces.values()
                for p in ps
            }
            for key in sorted(tensor_keys):
                _fill(ck, key, leaves[key], files)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{ck.path}: unreadable ({str(e)[:200]}); the checkpoint is corrupt"
            ) from None
    state = _unwrap(_replace_leaves(state, values), expert_views(module, d))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        set_state_dict(module, opts, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _restore_rng(ck, d)


def _restore_rng(ck: Checkpoint, d: Dist) -> None:
    f = ck.rng.get(d.rank)
    if f is None:  # more ranks than the run that wrote it: this rank keeps its seeded generator
        return
    try:
        with safe_open(str(f), framework="pt") as h:
            cpu = h.get_tensor(RNG_CPU)
            stored = set(h.keys())
            cuda = h.get_tensor(RNG_CUDA) if RNG_CUDA in stored and d.device.type == "cuda" else None
        want = torch.get_rng_state()
        if cpu.dtype != torch.uint8 or cpu.shape != want.shape:
            raise ValueError(f"{RNG_CPU} is {cpu.dtype} {list(cpu.shape)}, expected uint8 {list(want.shape)}")
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, d.device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{f}: cannot restore the RNG state ({str(e)[:200]}); the checkpoint is corrupt"
        ) from None


def restore_schedulers(ck: Checkpoint, scheds: Sequence[torch.optim.lr_scheduler.LRScheduler]) -> None:
    """Load the schedulers' JSON state. LambdaLR.load_state_dict copies every key onto the object,
    so only this run's own keys with numbers of the right kind are accepted."""
    if len(ck.state.schedulers) != len(scheds):
        raise CheckpointError(
            f"{ck.path / TRAINER_FILE}: holds {len(ck.state.schedulers)} schedulers, this run has {len(scheds)}"
        )
    for i, (s, saved) in enumerate(zip(scheds, ck.state.schedulers, strict=True)):
        now = s.state_dict()
        bad = set(saved) ^ set(now)
        for k in sorted(set(saved) & set(now)):
            a, b = saved[k], now[k]
            if isinstance(b, list):
                kinds_ok = (
                    isinstance(a, list)
                    and len(a) == len(b)
                    and all(
                        (x is None) == (y is None) and (x is None or isinstance(x, (int, float)))
                        for x, y in zip(a, b, strict=True)
                    )
                )
            else:
                kinds_ok = type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float)))
            if not kinds_ok or (isinstance(a, float) and not math.isfinite(a)):
                bad.add(k)
        if bad:
            raise CheckpointError(
                f"{ck.path / TRAINER_FILE}: scheduler {i} entry {sorted(bad)[0]!r} is not this run's; the checkpoint is corrupt"
            )
        s.load_state_dict(saved)


def read_model_state(path: Path) -> dict[str, Tensor]:
    """The model tensors of a checkpoint as full tensors, whatever plan wrote it (names as in the
    training module, `lm.` included)."""
    ck = open_checkpoint(path)
    out: dict[str, Tensor] = {}
    with contextlib.ExitStack() as stack:
        files: dict[Path, Any] = {}
        for key, ps in sorted(ck.pieces.items()):
            if not key.startswith("model/"):
                continue
            full = torch.empty(ps[0].global_shape, dtype=ST_TORCH[ps[0].dtype])
            for p in ps:
                if p.file not in files:
                    files[p.file] = stack.enter_context(safe_open(str(p.file), framework="pt"))
            _fill(ck, key, full, files)
            out[key.removeprefix("model/")] = full
    return out


# --- the Hugging Face export -------------------------------------------------------------------


def full_state_dict(module: nn.Module, d: Dist) -> dict[str, Tensor]:
    """The unsharded model state (all ranks take part; complete on rank 0), without `lm.`.
    Under pipeline parallel every stage gathers its part, and the first rank of each stage sends
    it to rank 0 (the copy of the embedding is not sent: its owner's is the same)."""
    # cpu_offload keeps the gathered tensors on global rank 0 only, which holds no later stage.
    offload = d.plan.pp == 1
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    params = dict(module.named_parameters())
    for n, view in sorted(expert_views(module, d).items()):  # every rank gathers, in one order
        sd[n] = view.piece.full(params[n].detach()).cpu()
    full = {k: cast(Tensor, v) for k, v in sd.items()}
    if d.plan.pp > 1:
        copies: frozenset[str] = getattr(module, "copy_names", frozenset())
        full = _gather_stages({k: v for k, v in full.items() if k not in copies}, d)
    return {k.removeprefix("lm."): v for k, v in full.items()}


def _gather_stages(sd: dict[str, Tensor], d: Dist) -> dict[str, Tensor]:
    """Rank 0 receives every stage's full tensors from its pipeline (the first rank of each
    stage: names, shapes and dtypes first, then the tensors one by one)."""
    if d.rank % (d.world // d.plan.pp):  # not on rank 0's pipeline: nothing to send
        return {}
    names = sorted(sd)
    table = [(k, tuple(sd[k].shape), str(sd[k].dtype).removeprefix("torch.")) for k in names]
    tables: list[list[tuple[str, tuple[int, ...], str]]] = [[] for _ in range(d.plan.pp)]
    dist.all_gather_object(tables, table, group=d.pp_group)
    ranks = dist.get_process_group_ranks(d.pp_group)
    if d.rank != 0:
        for k in names:
            dist.send(sd[k].detach().to(d.device).contiguous(), dst=0, group=d.pp_group)
        return {}
    out = {k: v.cpu() for k, v in sd.items()}
    for stage in range(1, d.plan.pp):
        for k, shape, dtype in tables[stage]:
            buf = torch.empty(shape, dtype=getattr(torch, dtype), device=d.device)
            dist.recv(buf, src=ranks[stage], group=d.pp_group)
            out[k] = buf.cpu()
    return out


def export_hf(module: nn.Module, spec: Any, out: Path, d: Dist) -> Path | None:
    """Write the trained weights in the Hugging Face layout (glmc.save_pretrained) on rank 0."""
    from glmc.api import save_pretrained
    from glmc.export.torch import build_model
    from glmc.pipeline import compile_graph

    sd = full_state_dict(module, d)
    if not d.is_main:
        return None
    with torch.device("meta"):
        plain = build_model(compile_graph(spec, dtype="f32"), dtype=torch.float32, device="meta")
    plain.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    plain.spec = spec
    return save_pretrained(plain, out)
