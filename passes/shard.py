"""shard{dp,tp,ep,pp}: place every parameter on the named mesh axes and make communication explicit.

Mesh (outermost first) pp x dp x ep x tp; world size is their product. The `ep` axis splits the
routed experts and is a data-parallel axis for everything else (DeepSeek-V3/GLM style "DP
attention + EP"), so expert weights are replicated over `dp` only and dense weights over
`dp x ep`.

- tp (Megatron layout): q/k/v (or fused qkv) rows split by heads, `o_proj` columns; KV heads
  split while tp <= num_kv_heads and replicated on tp / num_kv_heads consecutive ranks above
  (`kv_replication`); gate/up rows and down columns of the dense MLP, the shared expert and every
  routed expert (expert-tensor parallel); embedding and output head split by vocabulary rows.
  Norms, router, MTP `eh_proj` are replicated. An `all_reduce` follows every row-parallel output
  (attention, MLP, MoE, vocab-parallel embedding), an `all_gather` the vocab-parallel logits.
- ep: routed experts split on dim 0 (contiguous, or load-aware from `expert_load`, optionally
  with `redundant_experts` replicas); `all_to_all` dispatch and combine around each MoE.
- pp: trunk layers in contiguous stages balanced by `balance` cost (per-token FLOPs, or per-rank
  parameter bytes), embedding on the first stage, final norm, head and MTP layers on the last;
  a `send_recv` hands activations across each boundary; every node carries its `stage`.
- dp: replication only (recorded in the mesh; `inspect` uses it for ZeRO-style optimizer sharding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from glmc.ir import (
    Graph,
    Node,
    Op,
    Param,
    ParamRole,
    ShardSpec,
    max_local_numel,
    mesh_of,
    node_flops,
    with_shards,
)
from glmc.ir.attrs import AttentionAttrs, ExpertsAttrs, FfnAttrs, MoeAttrs

from . import _expert_placement as placement
from ._collectives import MOE_OPS as _MOE_OPS
from ._collectives import insert_collectives
from ._pipeline_stages import balance as balance_stages
from .base import Pass, PassError

# Far above any cluster (and any expert layout) built so far, and small enough that planning,
# verifying and printing a plan stays quick.
MAX_WORLD_SIZE = 2**20
MAX_EXPERT_SLOTS = 2**16
# Expert slots x MoE layers: the size of the expert maps the IR carries (and prints), which
# verification and per-rank memory walk. GLM-4.5 at MAX_EXPERT_SLOTS stays below it.
MAX_PLACEMENT_ENTRIES = 2**23
MAX_SEQ_LEN = 2**30


@dataclass(frozen=True)
class Shard(Pass):
    name: ClassVar[str] = "shard"
    # Sharding fused tensors needs their component boundaries, which fuse-moe records.
    after: ClassVar[tuple[str, ...]] = ("fuse-moe",)

    dp: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    redundant_experts: int = 0
    expert_load: str = ""
    balance: Literal["flops", "params"] = "flops"
    kv_replication: bool = True
    seq_len: int = 4096

    def __post_init__(self) -> None:
        for f in ("dp", "tp", "ep", "pp", "seq_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)}")
        if self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {self.redundant_experts}")
        world = self.pp * self.dp * self.ep * self.tp
        if world > MAX_WORLD_SIZE:
            raise ValueError(
                f"the mesh pp x dp x ep x tp = {self.pp} x {self.dp} x {self.ep} x {self.tp} = {world} ranks "
                f"exceeds {MAX_WORLD_SIZE}"
            )
        if self.redundant_experts > MAX_EXPERT_SLOTS:
            raise ValueError(f"redundant_experts={self.redundant_experts} exceeds {MAX_EXPERT_SLOTS}")
        if self.seq_len > MAX_SEQ_LEN:
            raise ValueError(f"seq_len={self.seq_len} exceeds {MAX_SEQ_LEN}")

    def apply(self, graph: Graph) -> Graph:
        if graph.attrs.mesh:
            raise PassError("shard: the graph is already sharded")
        self._check(graph)
        maps = self._expert_maps(graph)
        nodes = [replace(n, params=tuple(self._place(n, p, maps) for p in n.params)) for n in graph.nodes]
        stages = self._stages(graph, nodes)
        out = insert_collectives(graph, nodes, stages, ep=self.ep, tp=self.tp, pp=self.pp)
        mesh = (("pp", self.pp), ("dp", self.dp), ("ep", self.ep), ("tp", self.tp))
        attrs: dict[str, object] = {"mesh": mesh, "pp_stages": tuple(stages)}
        e = _num_experts(graph)
        if self.ep > 1 and e is not None:
            attrs["ep_slots"] = (e + self.redundant_experts) // self.ep
        return graph.replace_nodes(out).with_attrs(**attrs)

    # ---- plan checks ------------------------------------------------------------------------

    def _check(self, g: Graph) -> None:
        tp, ep = self.tp, self.ep
        att = g.find(Op.ATTENTION)
        if att:
            nh, nkv = AttentionAttrs.of(att[0]).num_heads, AttentionAttrs.of(att[0]).num_kv_heads
            if nh % tp:
                raise PassError(f"shard: tp={tp} does not divide attention.num_heads={nh}")
            if tp <= nkv and nkv % tp:
                raise PassError(f"shard: tp={tp} does not divide attention.num_kv_heads={nkv}")
            if tp > nkv and not self.kv_replication:
                raise PassError(
                    f"shard: tp={tp} exceeds attention.num_kv_heads={nkv} and kv_replication=false; "
                    f"use tp <= {nkv} or let ranks replicate KV heads"
                )
            if tp > nkv and tp % nkv:
                raise PassError(
                    f"shard: tp={tp} exceeds attention.num_kv_heads={nkv} but is not a multiple of it, "
                    "so KV heads cannot be replicated evenly"
                )
        for n in g.nodes:
            for field, size in _tp_widths(n):
                if size % tp:
                    raise PassError(f"shard: tp={tp} does not divide {field}={size} (node {n.name})")
        vocab = g.attrs.vocab_size
        if vocab % tp:
            raise PassError(
                f"shard: tp={tp} does not divide vocab_size={vocab} (vocabulary-parallel embedding)"
            )
        n_layers = g.attrs.num_layers
        if self.pp > n_layers:
            raise PassError(
                f"shard: pp={self.pp} exceeds num_layers={n_layers}; every pipeline stage needs a layer"
            )
        e = _num_experts(g)
        if (ep > 1 or self.redundant_experts or self.expert_load) and e is None:
            raise PassError(
                "shard: ep, redundant_experts and expert_load need MoE layers; this model has none"
            )
        if e is None:
            return
        if ep == 1 and (self.redundant_experts or self.expert_load):
            raise PassError(
                "shard: redundant_experts and expert_load place experts over ep ranks; set ep > 1"
            )
        if self.redundant_experts > e * (ep - 1):
            raise PassError(
                f"shard: redundant_experts={self.redundant_experts} exceeds moe.num_experts x (ep - 1) = "
                f"{e * (ep - 1)}: an expert can have at most one copy per rank"
            )
        slots = e + self.redundant_experts
        if slots > MAX_EXPERT_SLOTS:
            raise PassError(
                f"shard: moe.num_experts + redundant_experts = {slots} expert slots per layer exceeds "
                f"{MAX_EXPERT_SLOTS}"
            )
        moe_layers = sum(1 for n in g.nodes if n.op in _MOE_OPS)
        if ep > 1 and slots * moe_layers > MAX_PLACEMENT_ENTRIES:
            raise PassError(
                f"shard: {slots} expert slots x {moe_layers} MoE layers = {slots * moe_layers} expert-map "
                f"entries exceeds {MAX_PLACEMENT_ENTRIES}; use a smaller ep or fewer redundant_experts"
            )
        if slots % ep:
            divisors = [d for d in range(1, e + 1) if e % d == 0]
            fill = self.redundant_experts + (-slots) % ep
            # Suggest padding with replicas only where that plan would itself be accepted.
            pad = fill <= e * (ep - 1) and e + fill <= MAX_EXPERT_SLOTS
            raise PassError(
                f"shard: ep={ep} does not divide moe.num_experts={e}"
                + (f" + redundant_experts={self.redundant_experts}" if self.redundant_experts else "")
                + f"; use ep in {divisors}"
                + (
                    f", or redundant_experts={fill} to give each of the {ep} ranks {-(-slots // ep)} expert slots"
                    if pad
                    else ""
                )
            )

    # ---- placements -------------------------------------------------------------------------

    def _expert_maps(self, g: Graph) -> dict[int, tuple[tuple[int, ...], ...]]:
        e = _num_experts(g)
        if e is None or self.ep == 1:
            return {}
        layers = sorted(ExpertsAttrs.of(n).layer for n in g.nodes if n.op in _MOE_OPS)
        loads = placement.load_histograms(self.expert_load, e, layers) if self.expert_load else {}
        maps = {}
        for layer in layers:
            if layer in loads or self.redundant_experts:
                maps[layer] = placement.balanced(loads.get(layer, [1.0] * e), self.ep, self.redundant_experts)
            else:
                maps[layer] = placement.contiguous(e, self.ep)
        return maps

    def _place(self, n: Node, p: Param, maps: dict[int, tuple[tuple[int, ...], ...]]) -> Param:
        specs: list[ShardSpec] = []
        if self.ep > 1 and p.role is ParamRole.EXPERT:
            specs.append(ShardSpec("ep", 0, (p.shape[0],), (1,), maps[ExpertsAttrs.of(n).layer]))
        if self.tp > 1:
            t = self._tp_spec(n, p)
            if t is not None:
                specs.append(t)
        return with_shards(p, specs) if specs else p

    def _tp_spec(self, n: Node, p: Param) -> ShardSpec | None:
        name, shape = p.name, p.shape
        if n.op is Op.ATTENTION:
            a = AttentionAttrs.of(n)
            nh, nkv, d = a.num_heads, a.num_kv_heads, a.head_dim
            rep = self.tp // nkv if self.tp > nkv else 1
            if name.startswith("q_proj."):
                return ShardSpec("tp", 0, (nh * d,), (1,))
            if name.startswith(("k_proj.", "v_proj.")):
                return ShardSpec("tp", 0, (nkv * d,), (rep,))
            if name.startswith("qkv_proj."):
                return ShardSpec("tp", 0, (nh * d, nkv * d, nkv * d), (1, rep, rep))
            if name == "o_proj.weight":
                return ShardSpec("tp", 1, (nh * d,), (1,))
            return None
        if n.op in (Op.EMBED, Op.LM_HEAD):
            return ShardSpec("tp", 0, (shape[0],), (1,))
        if p.role is ParamRole.EXPERT:
            if name.endswith("gate_up_proj"):
                return ShardSpec("tp", 1, (shape[1] // 2, shape[1] // 2), (1, 1))
            return ShardSpec("tp", 2, (shape[2],), (1,))
        if p.role is not ParamRole.WEIGHT or n.op not in (Op.MLP, Op.MOE):
            return None
        if name.endswith("gate_up_proj.weight"):
            return ShardSpec("tp", 0, (shape[0] // 2, shape[0] // 2), (1, 1))
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            return ShardSpec("tp", 0, (shape[0],), (1,))
        if name.endswith("down_proj.weight"):
            return ShardSpec("tp", 1, (shape[1],), (1,))
        return None

    # ---- pipeline stages --------------------------------------------------------------------

    def _stages(self, g: Graph, nodes: list[Node]) -> list[tuple[int, int]]:
        n_layers = g.attrs.num_layers
        if self.pp == 1:
            return [(0, n_layers - 1)]
        mesh = {"pp": self.pp, "dp": self.dp, "ep": self.ep, "tp": self.tp}
        costs = [0] * n_layers
        for n in nodes:
            layer = n.attrs.layer
            if layer is not None and int(layer) < n_layers:
                unit = int(layer)
            else:  # the embedding rides with the first layer; head, final norm and MTP with the last
                unit = 0 if n.name in ("input_ids", "model.embed_tokens") else n_layers - 1
            if self.balance == "flops":
                costs[unit] += node_flops(n, self.seq_len)
            else:
                costs[unit] += sum(max_local_numel(p, mesh) * p.dtype.itemsize for p in n.params)
        # Stages must be distinguishable even for zero-cost layers.
        return balance_stages([c + 1 for c in costs], self.pp)


def check_launch(graph: Graph, world: int) -> None:
    """A sharded graph's mesh against the processes a run was launched with: the pass's one
    rule for every caller that runs a plan (training; a graph without a shard pass is one rank)."""
    m = mesh_of(graph)
    need = m["pp"] * m["dp"] * m["ep"] * m["tp"]
    if need != world:
        raise PassError(
            f"shard: the plan pp x dp x ep x tp = {m['pp']} x {m['dp']} x {m['ep']} x {m['tp']} needs {need} "
            f"processes but the launch has {world} (torchrun --nproc_per_node / WORLD_SIZE); change dp "
            f"(--dp), ep, tp, pp or the launch"
        )


def _num_experts(g: Graph) -> int | None:
    for n in g.nodes:
        if n.op in _MOE_OPS:
            return ExpertsAttrs.of(n).num_experts
    return None


def _tp_widths(n: Node) -> list[tuple[str, int]]:
    """The spec fields (and sizes) that tensor parallelism must divide on this node."""
    shared = "moe.intermediate_size x moe.num_shared_experts"
    if n.op is Op.MLP:
        size = FfnAttrs.of(n).intermediate_size
        return [(shared, size)] if n.name.endswith(".shared_experts") else [("mlp.intermediate_size", size)]
    if n.op is Op.EXPERTS:
        return [("moe.intermediate_size", ExpertsAttrs.of(n).intermediate_size)]
    if n.op is Op.MOE:
        a = MoeAttrs.of(n)
        return [("moe.intermediate_size", a.intermediate_size)] + (
            [(shared, a.shared_intermediate_size)] if a.shared_intermediate_size else []
        )
    return []
