"""The optimisers against torch's own: glmc's `Muon` is `torch.optim.Muon` (run per expert slice for
stacked [E, out, in] weights) and the trainer's AdamW is `torch.optim.AdamW` with GLM-4.5's
settings, step for step, with weight decay, on plain and stacked-expert parameters — offline with
gradients of every scale, and inside the trainer with its real gradients (`--optimizer muon` and
`--optimizer adamw`).

The one deliberate difference: torch's Newton–Schulz iteration runs in bf16, glmc's in fp32 on CPU
(bf16 on GPU, as torch). The references here run torch's optimizer with its iteration in fp64
(`_ns_fp64`, torch's code with the dtype changed), so the comparison is tight; torch's bf16
iteration is checked against that copy at bf16's tolerance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from glmc.train import TrainConfig, train
from glmc.train.optim import ADAMW_NAMES, Muon, build_optimizers, lr_factor, newton_schulz

from ._dist import hooked_optimizers
from .conftest import tiny_config

NS = ((3.4445, -4.7750, 2.0315), 5, 1e-7)  # torch.optim.Muon's coefficients, steps, eps


def _ns_fp64(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float) -> Tensor:
    """torch.optim._muon._zeropower_via_newtonschulz, line for line, in fp64 instead of bf16."""
    a, b, c = ns_coefficients
    x = grad.double()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    if grad.size(0) > grad.size(1):
        x = x.T
    return x.to(grad.dtype)


@pytest.fixture
def torch_muon_fp64(monkeypatch: pytest.MonkeyPatch) -> type[torch.optim.Optimizer]:
    """torch.optim.Muon whose Newton–Schulz runs in fp64 (see the module docstring)."""
    import torch.optim._muon as tm

    monkeypatch.setattr(tm, "_zeropower_via_newtonschulz", _ns_fp64)
    return torch.optim.Muon


# --- Newton–Schulz ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)], ids=["wide", "tall", "square"])
def test_the_fp64_reference_is_torchs_iteration(shape):
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        _zeropower_via_newtonschulz(g, *NS).float(), _ns_fp64(g, *NS), atol=0.03, rtol=0.05
    )


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (4, 24, 40), (4, 40, 24)])
def test_newton_schulz_is_torchs_iteration_per_matrix(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    g[0] *= 1e3  # each expert is normalised on its own: one large expert changes no other
    got = newton_schulz(g, *NS)
    want = torch.stack([_ns_fp64(m, *NS) for m in g.reshape(-1, *shape[-2:])]).reshape(shape)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


# --- Muon -------------------------------------------------------------------------------------


def test_muon_defaults_are_torchs_with_the_adamw_matched_rate():
    p = nn.Parameter(torch.zeros(4, 4))
    assert Muon([p]).defaults == {**torch.optim.Muon([p]).defaults, "adjust_lr_fn": "match_rms_adamw"}


def _grads(shape: tuple[int, ...], step: int) -> Tensor:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(100 + step))
    if len(shape) == 3:  # experts of very different gradient scale
        g *= torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    return g


@pytest.mark.parametrize(
    "shape", [(24, 40), (40, 24), (3, 16, 24), (3, 24, 16)], ids=["wide", "tall", "experts", "experts-tall"]
)
@pytest.mark.parametrize(
    ("nesterov", "adjust"),
    [(True, "match_rms_adamw"), (False, "match_rms_adamw"), (True, "original"), (True, None)],
    ids=["nesterov-rms", "plain-rms", "nesterov-original", "nesterov-default"],
)
def test_muon_matches_torch_muon_per_expert(torch_muon_fp64, shape, nesterov, adjust):
    """Six steps, a changing learning rate, weight decay 0.1: parameters and momentum equal torch's;
    a stacked [E, out, in] weight equals E separate torch.optim.Muon matrices."""
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours = nn.Parameter(w0.clone())
    theirs = [nn.Parameter(m.clone()) for m in (w0 if w0.ndim == 3 else w0[None])]
    kw: dict[str, Any] = {
        "lr": 0.02,
        "weight_decay": 0.1,
        "momentum": 0.9,
        "nesterov": nesterov,
        "adjust_lr_fn": adjust,
    }
    opt, ref = Muon([ours], **kw), torch_muon_fp64(theirs, **kw)
    for step in range(6):
        for group in (*opt.param_groups, *ref.param_groups):
            group["lr"] = 0.02 * (1 - 0.1 * step)  # as the schedule moves it
        g = _grads(shape, step)
        ours.grad = g.clone()
        for t, gm in zip(theirs, g if g.ndim == 3 else g[None], strict=True):
            t.grad = gm.clone()
        opt.step()
        ref.step()
        want = torch.stack([t.detach() for t in theirs]).reshape(shape)
        torch.testing.assert_close(
            ours.detach(), want, atol=1e-6, rtol=1e-6, msg=lambda m, s=step: f"step {s}: {m}"
        )
        bufs = torch.stack([ref.state[t]["momentum_buffer"] for t in theirs]).reshape(shape)
        torch.testing.assert_close(opt.state[ours]["momentum_buffer"], bufs, atol=0, rtol=1e-6)
    # The comparison is not between two no-ops: decay and updates moved the weights.
    assert (ours.detach() - w0).abs().mean() > 1e-3


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="2-D or stacked 3-D"):
        Muon([nn.Parameter(torch.randn(5))])


# --- the trainer's optimisers -------------------------------------------------------------------


def _expected_split(
    names: list[tuple[str, nn.Parameter]], optimizer: str
) -> tuple[set[str], set[str], set[str]]:
    """(Muon, AdamW with decay, AdamW without) by GLM-4.5's rule: Muon for every matrix and stacked
    expert weight but the embeddings and the output head; AdamW decays matrices only."""
    muon = {n for n, p in names if optimizer == "muon" and p.ndim >= 2 and not n.endswith(ADAMW_NAMES)}
    decay = {n for n, p in names if n not in muon and p.ndim >= 2}
    return muon, decay, {n for n, _ in names} - muon - decay


class _Reference:
    """torch.optim.AdamW and torch.optim.Muon (per expert slice) over copies of a model's
    parameters, with the hyperparameters `cfg` asks for; `step` copies the model's values and
    gradients in, steps, and returns the expected new values."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, muon_cls: type[torch.optim.Optimizer]) -> None:
        self.params = list(model.named_parameters())
        muon, decay, plain = _expected_split(self.params, cfg.optimizer)
        self.split = (muon, decay, plain)
        self.copies: dict[str, list[Tensor]] = {}
        for n, p in self.params:
            slices = list(p.detach()) if (n in muon and p.ndim == 3) else [p.detach()]
            self.copies[n] = [nn.Parameter(s.clone()) for s in slices]

        def of(names: set[str]) -> list[Tensor]:
            return [c for n, _ in self.params if n in names for c in self.copies[n]]

        self.opts: list[torch.optim.Optimizer] = [
            # torch's defaults otherwise (eps 1e-8)
            torch.optim.AdamW(
                [
                    {"params": of(decay), "weight_decay": cfg.weight_decay},
                    {"params": of(plain), "weight_decay": 0.0},
                ],
                lr=cfg.lr,
                betas=cfg.betas,
                foreach=False,
            )
        ]
        if muon:
            self.opts.append(
                muon_cls(of(muon), lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
            )

    @torch.no_grad()
    def step(self, lr: float) -> dict[str, Tensor]:
        for n, p in self.params:
            assert p.grad is not None, n
            grads = list(p.grad) if len(self.copies[n]) > 1 else [p.grad]
            values = list(p.detach()) if len(self.copies[n]) > 1 else [p.detach()]
            for c, v, g in zip(self.copies[n], values, grads, strict=True):
                c.copy_(v)
                c.grad = g.clone()
        for o in self.opts:
            for group in o.param_groups:
                group["lr"] = lr
            o.step()
        return {
            n: torch.stack([c.detach() for c in cs]) if len(cs) > 1 else cs[0].detach()
            for n, cs in self.copies.items()
        }


def _tiny_model() -> nn.Module:
    from glmc import presets
    from glmc.api import build_torch

    return build_torch(presets.get("glm-tiny"), dtype=torch.float32, seed=0)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_build_optimizers_steps_like_torchs_optimizers(torch_muon_fp64, optimizer):
    """Every parameter of glm-tiny, five steps, gradients from 1e-9 to 1 (AdamW's eps and bias
    correction matter at the small end): the built optimisers give torch's values."""
    model = _tiny_model()
    cfg = TrainConfig(optimizer=optimizer)
    opts = build_optimizers(model, cfg)
    ref = _Reference(model, cfg, torch_muon_fp64)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for o in opts if isinstance(o, Muon) for g in o.param_groups for p in g["params"]}
    assert in_muon == ref.split[0]
    if optimizer == "muon":
        assert (
            "model.layers.1.mlp.experts.gate_up_proj" in in_muon
            and "model.layers.1.mlp.gate.weight" in in_muon
        )
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        for i, (_, p) in enumerate(model.named_parameters()):
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** -(i % 10)
        lr = cfg.lr * (0.5 + 0.1 * step)
        for o in opts:
            for group in o.param_groups:
                group["lr"] = lr
        want = ref.step(lr)
        for o in opts:
            o.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(
                p.detach(), want[n], atol=1e-7, rtol=1e-6, msg=lambda m, n=n, s=step: f"step {s} {n}: {m}"
            )


class _Shadow:
    """Inside the trainer: before every optimizer step, the reference steps copies of the
    parameters with the trainer's own gradients (after clipping) and the learning rate of the
    schedule; after the step, every parameter must equal the reference's value."""

    def __init__(self, muon_cls: type[torch.optim.Optimizer]) -> None:
        self.muon_cls = muon_cls
        self.steps = 0
        self.worst = 0.0
        self.moved = 0.0

    def attach(self, model: nn.Module, cfg: TrainConfig, opts: list[torch.optim.Optimizer]) -> None:
        ref = _Reference(model, cfg, self.muon_cls)
        want: dict[str, Tensor] = {}
        before: dict[str, Tensor] = {}

        def pre(opt: Any, args: Any, kwargs: Any) -> None:
            lr = cfg.lr * lr_factor(self.steps, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
            before.update({n: p.detach().clone() for n, p in model.named_parameters()})
            want.update(ref.step(lr))

        def post(opt: Any, args: Any, kwargs: Any) -> None:
            self.steps += 1
            for n, p in model.named_parameters():
                torch.testing.assert_close(
                    p.detach(),
                    want[n],
                    atol=1e-7,
                    rtol=1e-6,
                    msg=lambda m, n=n: f"step {self.steps} {n}: {m}",
                )
                self.worst = max(self.worst, float((p.detach() - want[n]).abs().max()))
                self.moved = max(self.moved, float((p.detach() - before[n]).abs().max()))

        opts[0].register_step_pre_hook(pre)
        opts[-1].register_step_post_hook(post)


def test_trainer_muon_steps_are_torchs(tmp_path, corpus, torch_muon_fp64):
    shadow = _Shadow(torch_muon_fp64)
    with hooked_optimizers(shadow.attach):
        res = train(tiny_config(tmp_path, corpus, steps=4))
    assert shadow.steps == 4 and shadow.moved > 1e-3
    assert not math.isnan(res.records[-1]["loss"])


def test_cli_optimizer_adamw_trains_with_torchs_adamw_everywhere(tmp_path, corpus, torch_muon_fp64):
    """`glmc train --optimizer adamw`: every parameter (experts and router included) steps exactly as
    torch.optim.AdamW with GLM-4.5's betas, decay on matrices only, and the loss goes down."""
    import json

    from glmc.cli import main

    shadow = _Shadow(torch_muon_fp64)
    seen: list[list[torch.optim.Optimizer]] = []

    def attach(model: nn.Module, cfg: TrainConfig, opts: list[torch.optim.Optimizer]) -> None:
        seen.append(opts)
        shadow.attach(model, cfg, opts)

    run: Path = tmp_path / "run"
    argv = ["train", "glm-tiny", "--data", str(corpus), "-o", str(run), "--steps", "8", "--warmup-steps", "2",
            "--optimizer", "adamw", "--no-compile", "--no-progress", "--no-export", "--seq-len", "32",
            "--batch-size", "4"]  # fmt: skip
    with hooked_optimizers(attach):
        assert main(argv) == 0
    assert shadow.steps == 8 and shadow.moved > 1e-3
    assert len(seen) == 1 and [type(o) for o in seen[0]] == [torch.optim.AdamW]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0, losses
