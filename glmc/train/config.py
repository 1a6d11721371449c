"""The training run's settings: one frozen dataclass, filled by `glmc train` or by Python callers.

Defaults follow GLM-4.5's recipe (reference/training-stack.md §1.2) scaled to small runs:
Muon for hidden matrices, AdamW for the rest, warmup + cosine, MTP weight 0.3, sequence
balance loss 1e-4, loss-free bias rate 1e-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from glmc.errors import GlmcError


@dataclass(frozen=True)
class TrainConfig:
    spec: Any = "glm-tiny"  # a ModelSpec, preset, spec file, HF config or checkpoint folder (resolve_spec)
    data: tuple[str, ...] = ()  # text files or folders
    out: str = "runs/train"  # run folder: metrics.jsonl, checkpoints/, hf/
    pipeline: str | None = None  # passes to run on the graph (its shard pass is the parallel plan)
    # data
    tokenizer: str | None = None  # a Hugging Face tokenizer.json; None = built-in byte-level
    include: tuple[str, ...] = ("*",)  # file-name globs taken from folders
    exclude: tuple[str, ...] = ()  # path-component globs skipped in folders (e.g. site-packages)
    max_bytes: int | None = None  # stop reading the corpus after this many bytes
    seq_len: int = 256
    batch_size: int = 8  # global batch in sequences per optimizer step; split evenly over data-parallel ranks
    grad_accum: int = 1  # micro-batches per optimizer step: each rank's batch is cut into this many
    # schedule and optimiser
    steps: int = 100
    # Peak learning rate of both optimisers: Muon scales its update to AdamW's RMS
    # (adjust_lr_fn="match_rms_adamw", the Moonlight rule), so one rate serves both.
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak (GLM-4.5: 2.5e-5 / 2.5e-4)
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: str = "muon"  # "muon" (Muon + AdamW, as GLM-4.5) or "adamw" (AdamW everywhere)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # losses
    mtp_weight: float = 0.3
    balance_loss: float = 1e-4  # sequence-level balance loss weight; 0 disables
    bias_update_rate: float = 1e-3  # loss-free balancing; 0 disables
    # execution
    compile: bool = True
    activation_checkpoint: bool = False
    # Shorthands for shard{dp,ep,tp,pp} (the pass's mesh pp x dp x ep x tp = world size; ep is
    # also a data-parallel axis for non-expert weights, so dp x ep ranks read distinct data).
    dp: int | None = None  # replicas (None: world size / (ep * tp * pp))
    ep: int = 1  # expert-parallel degree
    tp: int = 1  # tensor-parallel degree (heads, MLP and expert columns, vocabulary)
    pp: int = 1  # pipeline stages
    fsdp: bool = True  # FSDP2-shard non-expert weights over the dp x ep data-parallel ranks
    seed: int = 0
    dtype: str = "auto"  # "auto": bf16 autocast on GPU, fp32 on CPU; or "fp32", "bf16"
    # bookkeeping
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: str | None = None  # checkpoint folder, or "auto" (latest in out/checkpoints)
    export_hf: bool = True  # write out/hf (Hugging Face layout) at the end
    peak_tflops: float | None = None  # for MFU; None: a stated default per device
    progress: bool = True
    init_router_bias: tuple[float, ...] | None = None  # start biases (tests: a skewed router)
    force: bool = False  # a non-empty run folder without resume: delete its contents and start over

    def __post_init__(self) -> None:
        problems = [msg for msg in self._problems() if msg]
        if problems:
            raise GlmcError(f"train config: {problems[0]}")

    def _problems(self) -> list[str | None]:
        """One message per bad setting (None where it is fine), each naming the field and its flag."""
        return [
            _integer(self.seq_len, "seq_len (--seq-len)", 4),
            _integer(self.batch_size, "batch_size (--batch-size)", 1),
            _integer(self.steps, "steps (--steps)", 1),
            _integer(self.warmup_steps, "warmup_steps (--warmup-steps)", 0),
            _number(self.lr, "lr (--lr)", 0.0, low_open=True),
            _number(self.min_lr_ratio, "min_lr_ratio (--min-lr-ratio)", 0.0, 1.0),
            _number(self.weight_decay, "weight_decay (--weight-decay)", 0.0),
            _betas(self.betas),
            None if self.optimizer in ("muon", "adamw") else
            f"optimizer (--optimizer) must be muon or adamw, got {self.optimizer!r}",
            _number(self.grad_clip, "grad_clip (--grad-clip)", 0.0),
            _number(self.mtp_weight, "mtp_weight (--mtp-weight)", 0.0),
            _number(self.balance_loss, "balance_loss (--balance-loss)", 0.0),
            _number(self.bias_update_rate, "bias_update_rate (--bias-update-rate)", 0.0),
            None if self.dtype in ("auto", "fp32", "bf16") else
            f"dtype (--dtype) must be auto, fp32 or bf16, got {self.dtype!r}",
            None if self.dp is None else _integer(self.dp, "dp (--dp)", 1),
            _integer(self.ep, "ep (--ep)", 1),
            _integer(self.tp, "tp (--tp)", 1),
            _integer(self.pp, "pp (--pp)", 1),
            # The sampler seeds torch.Generator with seed * 1_000_003 + epoch, which must fit 64 bits.
            _integer(self.seed, "seed (--seed)", 0, 2**32 - 1),
            _integer(self.log_every, "log_every (--log-every)", 1),
            _integer(self.save_every, "save_every (--save-every)", 0),
            _integer(self.keep_checkpoints, "keep_checkpoints", 0),
            None if self.max_bytes is None else _integer(self.max_bytes, "max_bytes (--max-bytes)", 1),
            None if self.peak_tflops is None else _number(self.peak_tflops, "peak_tflops (--peak-tflops)", 0.0, low_open=True),
            None if self.init_router_bias is None else next(
                (f"init_router_bias must hold finite numbers, got {v!r}" for v in self.init_router_bias
                 if _number(v, "", None)), None),
            None if isinstance(self.out, str) and self.out.strip() else f"out (-o) must name a folder, got {self.out!r}",
            None if self.resume is None or (isinstance(self.resume, str) and self.resume.strip())
            else f"resume (--resume) must be a checkpoint folder or 'auto', got {self.resume!r}",
            None if not (self.force and self.resume is not None) else
            "--force deletes the run folder's contents to start over; it cannot be combined with --resume",
            self._grad_accum_problem(),
        ]  # fmt: skip

    def _grad_accum_problem(self) -> str | None:
        accum = self.grad_accum
        if not (isinstance(accum, int) and not isinstance(accum, bool) and accum >= 1):
            return f"grad_accum (--grad-accum) must be an integer >= 1, got {accum!r}"
        if isinstance(self.batch_size, int) and self.batch_size % accum:
            return (
                f"batch_size (--batch-size) {self.batch_size} must be a multiple of grad_accum "
                f"(--grad-accum) {accum}: batch_size is the global batch per optimizer step and each "
                f"micro-batch holds batch_size / grad_accum sequences"
            )
        return None

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _integer(v: object, name: str, low: int, high: int | None = None) -> str | None:
    if _is_int(v) and low <= v and (high is None or v <= high):  # type: ignore[operator]
        return None
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    return f"{name} must be an integer {bound}, got {v!r}"


def _number(
    v: object, name: str, low: float | None, high: float | None = None, low_open: bool = False
) -> str | None:
    """None if v is a finite real number within the bounds; else the message naming `name`."""
    ok = (_is_int(v) or isinstance(v, float)) and math.isfinite(v)  # type: ignore[arg-type]
    if ok and low is not None:
        ok = v > low if low_open else v >= low  # type: ignore[operator]
    if ok and high is not None:
        ok = v <= high  # type: ignore[operator]
    if ok:
        return None
    rule = "a finite number"
    if low is not None:
        rule += f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        rule += f" and <= {high:g}"
    return f"{name} must be {rule}, got {v!r}"


def _betas(v: object) -> str | None:
    if (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(_number(b, "", 0.0, 1.0) is None and b != 1 for b in v)
    ):
        return None
    return f"betas must be two finite numbers in [0, 1), got {v!r}"
