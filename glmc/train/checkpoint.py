"""Distributed checkpoints (torch.distributed.checkpoint) and the Hugging Face export.

A checkpoint folder `out/checkpoints/step-NNNNNN/` holds DCP's files for the model (router
biases included: they are persistent buffers) and the optimisers, `trainer.json` (step,
schedulers, config, data fingerprint) and one `rng-RANK.pt` per rank. The data sampler is a
function of the step, so the step is its whole state. Written to a temporary folder, then
renamed: a folder with this name is complete.

Expert-parallel weights are plain local tensors (one slice per EP rank); for DCP they are
presented as DTensors sharded over the EP mesh (replicated over edp), so the checkpoint holds
the global [E, ...] tensors and can be read back under another plan.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from glmc.errors import CheckpointError
from glmc.train.parallel import expert_params
from glmc.train.plan import Dist

TRAINER_FILE = "trainer.json"


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    schedulers: list[dict[str, Any]]
    config: dict[str, Any]
    data: dict[str, Any]  # fingerprint: tokenizer, seq_len, num_sequences


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def latest(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / TRAINER_FILE).is_file())
    return done[-1] if done else None


def _expert_names(module: nn.Module) -> set[str]:
    ids = {id(p) for p in expert_params(module)}
    return {n for n, p in module.named_parameters() if id(p) in ids}


def _wrap_experts(sd: dict[str, Any], names: set[str], mesh: Any) -> dict[str, Any]:
    """Model or optimiser state with expert tensors as DTensors [Replicate over edp, Shard(0) over ep]."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def wrap(t: Any) -> Any:
        if isinstance(t, Tensor) and not isinstance(t, DTensor) and t.ndim >= 1:
            return DTensor.from_local(t, mesh, [Replicate(), Shard(0)], run_check=False)
        return t

    out: dict[str, Any] = {}
    for k, v in sd.items():
        if k in names:
            out[k] = wrap(v)
        elif k == "state" and isinstance(v, dict):  # optimiser state keyed by parameter name
            out[k] = {
                pk: ({sk: wrap(sv) for sk, sv in pv.items()} if pk in names else pv) for pk, pv in v.items()
            }
        else:
            out[k] = v
    return out


def _unwrap(sd: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(sd, dict):
        return {k: _unwrap(v) for k, v in sd.items()}
    if isinstance(sd, DTensor) and sd.device_mesh.mesh_dim_names == ("edp", "ep"):
        return sd.to_local()
    return sd


def _dcp_state(module: nn.Module, opts: list[torch.optim.Optimizer], d: Dist) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(module, opts)
    if d.plan.ep > 1:
        names, mesh = _expert_names(module), d.ep_mesh
        model_sd = _wrap_experts(model_sd, names, mesh)
        optim_sd = _wrap_experts(optim_sd, names, mesh)
    return {"model": model_sd, "optim": optim_sd}


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
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    with warnings.catch_warnings():  # DCP warns that a single process saves alone
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_dcp_state(module, opts, d), checkpoint_id=str(tmp), no_dist=d.world == 1)
    torch.save(torch.get_rng_state(), tmp / f"rng-{d.rank}.pt")
    if d.is_main:
        body = {
            "step": state.step,
            "schedulers": state.schedulers,
            "config": state.config,
            "data": state.data,
        }
        (tmp / TRAINER_FILE).write_text(json.dumps(body, indent=2, default=str) + "\n")
    d.barrier()
    if d.is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        old = sorted(p for p in final.parent.glob("step-*") if p != final)
        for p in old[: max(0, len(old) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    d.barrier()
    return final


def read_trainer_state(path: Path) -> TrainerState:
    """Validate a checkpoint folder's bookkeeping (before any weights are touched)."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    f = path / TRAINER_FILE
    if not f.is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path}: not a complete glmc training checkpoint (needs {TRAINER_FILE} and DCP's .metadata)"
        )
    try:
        body = json.loads(f.read_text())
        return TrainerState(
            int(body["step"]), list(body["schedulers"]), dict(body["config"]), dict(body["data"])
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: unreadable ({e}); the checkpoint is corrupt") from None


def load(path: Path, module: nn.Module, opts: list[torch.optim.Optimizer], d: Dist) -> None:
    """Load weights, router biases and optimiser state in place; restore this rank's RNG."""
    state = _dcp_state(module, opts, d)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), no_dist=d.world == 1)
    except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
        # CheckpointException carries each rank's traceback; its last line names the cause.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = lines[-1] if lines else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot restore the model and optimiser state ({msg[:300]}); "
            "the checkpoint is corrupt or was written for another model"
        ) from None
    state = _unwrap(state)
    set_state_dict(module, opts, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng-{d.rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True))


def full_state_dict(module: nn.Module, d: Dist) -> dict[str, Tensor]:
    """The unsharded model state (all ranks take part; complete on rank 0), without `lm.`."""
    names = _expert_names(module)
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.plan.ep > 1:
        params = dict(module.named_parameters())
        for n in sorted(names):
            local = params[n].detach()
            parts = [torch.empty_like(local) for _ in range(d.plan.ep)]
            dist.all_gather(parts, local.contiguous(), group=d.ep_group)
            sd[n] = torch.cat(parts).cpu()
    return {k.removeprefix("lm."): cast(Tensor, v) for k, v in sd.items()}


def export_hf(module: nn.Module, spec: Any, out: Path, d: Dist) -> Path | None:
    """Write the trained weights in the Hugging Face layout (glmc.save_pretrained) on rank 0."""
    from glmc.api import save_pretrained
    from glmc.export.torch import build_model
    from glmc.lower import lower

    sd = full_state_dict(module, d)
    if not d.is_main:
        return None
    with torch.device("meta"):
        plain = build_model(lower(spec), dtype=torch.float32, device="meta")
    plain.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    plain.spec = spec
    return save_pretrained(plain, out)
