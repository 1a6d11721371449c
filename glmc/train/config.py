"""The training run's settings: one frozen dataclass, filled by `glmc train` or by Python callers.

Defaults follow GLM-4.5's recipe (reference/training-stack.md §1.2) scaled to small runs:
Muon for hidden matrices, AdamW for the rest, warmup + cosine, MTP weight 0.3, sequence
balance loss 1e-4, loss-free bias rate 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from glmc.errors import GlmcError


@dataclass(frozen=True)
class TrainConfig:
    spec: Any = "glm-tiny"  # a ModelSpec, preset, spec file, HF config or checkpoint folder (resolve_spec)
    data: tuple[str, ...] = ()  # text files or folders
    out: str = "runs/train"  # run folder: metrics.jsonl, checkpoints/, hf/
    pipeline: str | None = None  # passes to run on the graph (a shard pass supplies the plan)
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
    lr: float = 3e-3  # peak AdamW learning rate (embeddings, head, norms, biases)
    muon_lr: float = 2e-2  # peak Muon learning rate (hidden matrices incl. experts)
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
    dp: int | None = None  # data-parallel degree (None: world size / (tp * pp))
    ep: int = 1  # expert-parallel degree (borrows from the data-parallel ranks)
    tp: int = 1  # tensor-parallel degree for attention (heads split over tp ranks)
    fsdp: bool = True  # FSDP2-shard dense weights over the data-parallel ranks when dp > 1
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

    def __post_init__(self) -> None:
        checks = [
            (self.seq_len >= 4, "seq_len must be at least 4"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.steps >= 1, "steps must be at least 1"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must lie in [0, 1]"),
            (self.optimizer in ("muon", "adamw"), f"optimizer must be muon or adamw, not {self.optimizer!r}"),
            (self.dtype in ("auto", "fp32", "bf16"), f"dtype must be auto, fp32 or bf16, not {self.dtype!r}"),
            (self.mtp_weight >= 0 and self.balance_loss >= 0, "loss weights must be >= 0"),
            (self.bias_update_rate >= 0, "bias_update_rate must be >= 0"),
            (
                self.ep >= 1 and self.tp >= 1 and (self.dp is None or self.dp >= 1),
                "dp, ep and tp must be >= 1",
            ),
        ]
        accum = self.grad_accum
        if isinstance(accum, int) and not isinstance(accum, bool) and accum >= 1:
            checks.append((
                self.batch_size % accum == 0,
                f"batch_size (--batch-size) {self.batch_size} must be a multiple of grad_accum "
                f"(--grad-accum) {accum}: batch_size is the global batch per optimizer step and each "
                f"micro-batch holds batch_size / grad_accum sequences",
            ))  # fmt: skip
        else:
            checks.append((False, f"grad_accum (--grad-accum) must be an integer >= 1, got {accum!r}"))
        for ok, msg in checks:
            if not ok:
                raise GlmcError(f"train config: {msg}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
