"""Per-rank memory of a sharded graph: parameter bytes, training state, KV cache per token.

Ranks of one pipeline stage differ only in which tensor-parallel and expert-parallel piece they
hold, and every plan the `shard` pass makes gives them equal pieces; the numbers are for the
rank that holds the most (the worst case). Counted:

- parameters at their storage dtype (bf16 weights, fp32 router bias, FP8 weights with fp32
  scales after quantize-fp8). A checkpoint-only copy (the MTP layer's embedding, a tied head) is
  free when its owner sits on the same stage and a real copy otherwise, as in Megatron;
- for training, per trainable parameter (not the router's correction bias, a buffer updated
  outside the optimizer; not FP8 scales): a gradient, an optional master copy and the
  optimizer states, each at the dtype the assumptions give. With `shard_optimizer` (ZeRO-1)
  the master copy and the optimizer states are split over the data-parallel ranks holding the
  same piece (`dp`, times `ep` for non-expert parameters). Activations are not counted;
- K and V bytes one token adds to the cache of the stage's attention layers (trunk and MTP
  separately), with KV heads split over `tp` (a replicated head counts on every rank).

`TrainingAssumptions.glmc_train()` states what `glmc train` really holds, so `glmc inspect
--train` predicts its bytes exactly: parameters and gradients in fp32, no master copy; Muon's
momentum (one state) for every matrix but the embedding and head, AdamW's m and v plus its
4-byte step tensor for those, norms and biases (`--optimizer adamw`: AdamW everywhere); FSDP2
chunks dim 0 of every weight except the routed experts the pass split (held whole per slot) over
the dp x ep data-parallel ranks — the figures are the rank holding the first chunks (the most).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .attrs import AttentionAttrs
from .dtypes import DType
from .graph import Graph, Param, ParamRole
from .ops import Op
from .placement import max_local_numel, mesh_of, replicated_over, shard_specs, stage_of

_NOT_TRAINED = (ParamRole.ROUTER_BIAS, ParamRole.SCALE)
_ADAMW_ROLES = (ParamRole.EMBEDDING, ParamRole.OUTPUT)  # glmc train: AdamW for these (GLM-4.5)


@dataclass(frozen=True)
class TrainingAssumptions:
    """Dtypes of the training state. Defaults: mixed precision with bf16 parameters (their
    storage dtype), fp32 gradients, an fp32 master copy and Adam's m and v in fp32."""

    grad: DType = DType.F32
    master: DType | None = DType.F32
    optimizer: DType = DType.F32
    optimizer_states: int = 2
    shard_optimizer: bool = False
    kv: DType | None = None  # None: the graph's dtype
    param: DType | None = None  # None: each parameter's storage dtype
    # "muon" / "adamw": glmc train's optimisers by parameter (overrides optimizer_states)
    optimizers: str | None = None
    fsdp: bool = False  # FSDP2: dim 0 chunked over dp x ep (not the split routed experts)

    @classmethod
    def glmc_train(cls, optimizer: str = "muon", fsdp: bool = True) -> TrainingAssumptions:
        """What `glmc train` holds per rank (fp32 weights; see the module docstring)."""
        if optimizer not in ("muon", "adamw"):
            raise ValueError(f"optimizer must be muon or adamw, got {optimizer!r}")
        return cls(param=DType.F32, master=None, optimizers=optimizer, fsdp=fsdp)

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": str(self.param) if self.param else "storage dtype of each parameter",
            "grad": str(self.grad),
            "master": str(self.master) if self.master else "none",
            "optimizer": (
                f"glmc train's {self.optimizers}: Muon 1 x {self.optimizer} for matrices but embedding/head, "
                f"AdamW 2 x {self.optimizer} + an f32 step for the rest"
                if self.optimizers == "muon"
                else f"AdamW 2 x {self.optimizer} + an f32 step"
                if self.optimizers == "adamw"
                else f"{self.optimizer_states} x {self.optimizer}"
            ),
            "fsdp": self.fsdp,
            "shard_optimizer": self.shard_optimizer,
            "kv_cache": str(self.kv) if self.kv else "graph dtype",
            "activations": "not counted",
        }


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Stage:
    params: int = 0
    param_bytes: int = 0
    grad_bytes: int = 0
    master_bytes: int = 0
    optimizer_bytes: int = 0
    kv: int = 0
    mtp_kv: int = 0

    def add_param(self, p: Param, numel: int, replicas: int, opts: TrainingAssumptions) -> None:
        self.params += numel
        self.param_bytes += numel * (opts.param or p.dtype).itemsize
        if p.role in _NOT_TRAINED:
            return
        self.grad_bytes += numel * opts.grad.itemsize
        held = _ceil_div(numel, replicas) if opts.shard_optimizer else numel
        if opts.master is not None:
            self.master_bytes += held * opts.master.itemsize
        if opts.optimizers is None:
            self.optimizer_bytes += held * opts.optimizer_states * opts.optimizer.itemsize
        elif opts.optimizers == "muon" and len(p.shape) >= 2 and p.role not in _ADAMW_ROLES:
            self.optimizer_bytes += held * opts.optimizer.itemsize  # the momentum buffer
        else:  # AdamW: exp_avg, exp_avg_sq, and the step count as an f32 scalar tensor
            self.optimizer_bytes += 2 * held * opts.optimizer.itemsize + DType.F32.itemsize


def _fsdp_numel(p: Param, mesh: dict[str, int]) -> int:
    """Elements of `p` on the rank holding FSDP2's first dim-0 chunk of its (tp/ep-local) piece."""
    shape = list(p.shape)
    for s in shard_specs(p):
        shape[s.dim] = max(map(len, s.index)) if s.index else s.local_size(mesh[s.axis], 0)
    if shape:
        shape[0] = _ceil_div(shape[0], mesh["dp"] * mesh["ep"])
    n = 1
    for d in shape:
        n *= d
    return n


def per_rank_memory(g: Graph, opts: TrainingAssumptions | None = None) -> dict[str, Any]:
    opts = opts or TrainingAssumptions()
    mesh = mesh_of(g)
    n_stages, n_layers = mesh["pp"], g.attrs.num_layers
    stages = [_Stage() for _ in range(n_stages)]
    layers: list[set[int]] = [set() for _ in range(n_stages)]
    owner_stage = {f"{n.name}.{p.name}": stage_of(n) for n in g.nodes for p in n.params}
    kv_item = (opts.kv or g.attrs.dtype).itemsize
    for n in g.nodes:
        s = stage_of(n)
        layer = n.attrs.layer
        if layer is not None:
            layers[s].add(layer)
        for p in n.params:
            if p.tied_to is not None and owner_stage.get(p.tied_to) == s:
                continue  # shares the owner's storage on this stage
            # FSDP2 shards what it owns (trained weights but the pass's split experts; buffers not).
            fsdp = (
                opts.fsdp
                and p.role not in _NOT_TRAINED
                and not (p.role is ParamRole.EXPERT and shard_specs(p))
            )
            numel = _fsdp_numel(p, mesh) if fsdp else max_local_numel(p, mesh)
            stages[s].add_param(p, numel, replicated_over(p, mesh), opts)
        if n.op is Op.ATTENTION:
            a, tp = AttentionAttrs.of(n), mesh["tp"]
            local_heads = a.num_kv_heads // tp if tp <= a.num_kv_heads else 1
            b = 2 * local_heads * a.head_dim * kv_item
            if layer is not None and layer >= n_layers:
                stages[s].mtp_kv += b
            else:
                stages[s].kv += b
    rows = [_report(i, st, layers[i], n_layers) for i, st in enumerate(stages)]
    keys = [k for k in rows[0] if k.endswith("bytes") or k.endswith("per_token") or k == "params"]
    world = 1
    for v in mesh.values():
        world *= v
    return {
        "mesh": mesh,
        "world_size": world,
        "assumptions": opts.as_dict(),
        "stages": rows,
        "per_rank": {k: max(r[k] for r in rows) for k in keys},
    }


def _report(i: int, st: _Stage, layers: set[int], n_layers: int) -> dict[str, Any]:
    trunk = sorted(x for x in layers if x < n_layers)
    training = st.param_bytes + st.grad_bytes + st.master_bytes + st.optimizer_bytes
    return {
        "stage": i,
        "layers": [trunk[0], trunk[-1]] if trunk else [],
        "mtp_layers": sorted(x for x in layers if x >= n_layers),
        "params": st.params,
        "param_bytes": st.param_bytes,
        "grad_bytes": st.grad_bytes,
        "master_bytes": st.master_bytes,
        "optimizer_bytes": st.optimizer_bytes,
        "training_bytes": training,
        "kv_cache_bytes_per_token": st.kv,
        "mtp_kv_cache_bytes_per_token": st.mtp_kv,
    }
