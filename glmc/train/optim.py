"""Optimisers (Muon + AdamW, as GLM-4.5), the warmup + cosine schedule, global-norm clipping.

GLM-4.5 uses Muon for every matrix except the word embeddings (and here the output head, which
shares the embedding's role), with AdamW for embeddings, head, biases and norm weights; Muon's
update is rescaled to RMS 0.2 so one learning rate serves both (torch's
`adjust_lr_fn="match_rms_adamw"`, the Moonlight rule the paper describes).

`Muon` below is torch.optim.Muon's math (its own Newton–Schulz and learning-rate functions),
extended where torch's class stops: stacked expert weights [E, out, in] get one
orthogonalisation per expert (torch's class accepts 2-D parameters only), and FSDP2-sharded
DTensors are gathered for the orthogonalisation (it needs the whole matrix) and re-sharded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.optim._muon import _adjust_lr

from glmc.train.config import TrainConfig

ADAMW_NAMES = ("embed_tokens.weight", "lm_head.weight")


def newton_schulz(g: Tensor, coeffs: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """torch.optim.Muon's quintic Newton–Schulz iteration, batched over leading dims ([..., m, n]:
    one orthogonalisation per expert). bf16 on GPU as torch does; fp32 on CPU, where bf16
    matmuls are slow and the iteration is cheap anyway."""
    a, b, c = coeffs
    x = g.to(torch.bfloat16 if g.device.type == "cuda" else torch.float32)
    wide = g.size(-2) > g.size(-1)
    if wide:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if wide else x


class Muon(torch.optim.Optimizer):
    """Momentum + Newton–Schulz orthogonalised updates for 2-D and stacked 3-D weights."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = "match_rms_adamw",
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "ns_coefficients": (3.4445, -4.7750, 2.0315),  # torch.optim.Muon's defaults
            "eps": 1e-7,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D or stacked 3-D weights, got shape {tuple(p.shape)}")

    def _orthogonalise(self, u: Tensor, group: dict[str, Any]) -> Tensor:
        return newton_schulz(u, group["ns_coefficients"], group["ns_steps"], group["eps"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                u = p.grad.lerp(buf, mom) if group["nesterov"] else buf
                o: Tensor
                piece = getattr(p, "glmc_piece", None)
                if piece is not None and piece.has("tp"):
                    # Expert-TP slice: orthogonalise each whole expert matrix (gathered over tp),
                    # then keep this rank's columns; the ep slots are whole experts already.
                    tp_piece = piece.only("tp")
                    o = tp_piece.local(self._orthogonalise(tp_piece.full(u), group).to(u.dtype))
                elif isinstance(u, DTensor):
                    placements = u.placements
                    if u.ndim == 3 and all(isinstance(pl, Shard) and pl.dim == 0 for pl in placements):
                        # Whole experts per rank: orthogonalise the local ones, no gather.
                        local = self._orthogonalise(u.to_local(), group).to(u.dtype)
                        o = DTensor.from_local(local, u.device_mesh, placements, run_check=False)
                    else:
                        full = self._orthogonalise(u.full_tensor(), group).to(u.dtype)
                        o = distribute_tensor(full, u.device_mesh, placements, src_data_rank=None)
                else:
                    o = self._orthogonalise(u, group).to(u.dtype)
                adjusted = _adjust_lr(lr, group["adjust_lr_fn"], p.shape[-2:])
                p.mul_(1 - lr * wd)
                p.add_(o, alpha=-adjusted)


def split_params(model: nn.Module, optimizer: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon params, AdamW params). Muon: matrices and stacked experts except embeddings/head."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if optimizer == "muon" and p.ndim >= 2 and not name.endswith(ADAMW_NAMES):
            muon.append(p)
        else:
            adamw.append(p)
    return muon, adamw


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    muon, adamw = split_params(model, cfg.optimizer)
    decay = [p for p in adamw if p.ndim >= 2]  # embeddings and head decay; norms and biases do not
    no_decay = [p for p in adamw if p.ndim < 2]
    # One fused kernel (CPU and CUDA; DTensor shards it per shard, so FSDP2 alone fuses too); the
    # per-tensor loop where DTensor shards and plain tensors mix (EP + FSDP), which neither fused
    # nor foreach can group.
    kinds = {isinstance(p, DTensor) for p in adamw}
    fused = len(kinds) <= 1
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=1e-8,
            foreach=False,
            fused=fused,
        )
    ]
    if muon:
        opts.append(Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay))
    return opts


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from 0 to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedulers(
    opts: list[torch.optim.Optimizer], cfg: TrainConfig
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    def f(step: int) -> float:
        return lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)

    return [torch.optim.lr_scheduler.LambdaLR(o, f) for o in opts]


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], replicas: dict[int, int | Tensor], max_norm: float) -> float:
    """Global L2 norm of all gradients across ranks, then scale them to at most `max_norm`.

    Each rank holds a local piece of each gradient: a DTensor shard, an expert-parallel slice,
    or a full replica. `replicas[id(p)]` says on how many ranks the same piece lives (for expert
    slots one count per slot: a redundant expert lives on more ranks), so
    Σ_ranks Σ_params |piece|² / replicas is the square of the true global norm."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        rep = replicas.get(id(p), 1)
        if isinstance(rep, Tensor):  # per leading slot
            total += (g.double().pow(2).flatten(1).sum(1).cpu() / rep).sum()
        else:
            total += g.double().pow(2).sum().cpu() / rep
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = total.to(params[0].device)
        dist.all_reduce(t)
        total = t.double().cpu()
    norm = math.sqrt(float(total))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
