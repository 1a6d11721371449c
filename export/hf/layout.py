"""The checkpoint a (passed) graph describes: which tensors each rank's files hold, and which
pieces of which Hugging Face tensors each is made of. Torch-free.

The unit everything is expressed in is the *logical tensor*: one tensor of the plain Hugging
Face checkpoint (`model.layers.3.mlp.experts.17.up_proj.weight`, `...self_attn.k_proj.bias`;
MTP layers at index num_layers + k). A checkpoint tensor is the flat, C-order concatenation of
`Piece`s, each a row range (and for 2-D, a column range) of one logical tensor:

- `weight_layout="fused"` (after fuse-moe): one tensor per IR parameter, under its IR name:
  `qkv_proj.weight` = [q; k; v] rows, `gate_up_proj.weight` = [gate; up],
  `experts.gate_up_proj` = for each expert [gate_e; up_e], `experts.down_proj` = [down_e ...];
- otherwise the Hugging Face layout: one tensor per logical tensor, under its own name;
- with a shard plan, a rank holds only its stage's parameters, its experts (global expert ids
  stay in the names) and its tensor-parallel rows/columns of each component;
- with quantize-fp8, an FP8 tensor is followed by its scales, whose rows are the concatenation
  of the pieces' own scale rows (`*_scale_inv` for block128, `*_scale` for channel).

Reading a checkpoint back inverts the same description (logical.py), so every layout glmc
writes converts back to the Hugging Face one bit for bit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from glmc.ir import DType, Graph, Node, Param, ParamRole, local_shape, mesh_of, shard_specs, stage_of
from glmc.ir.naming import hf_name
from glmc.ir.quant import BLOCK, cdiv, scale_suffix

Coords = dict[str, int]


@dataclass(frozen=True)
class Piece:
    """Rows [rows) (and columns [cols) of a 2-D tensor) of logical tensor `source`, whose full
    shape is `shape`. A checkpoint-only copy (MTP embedding / head) names its owner as
    `fallback`, read when the source checkpoint lacks the copy."""

    source: str
    shape: tuple[int, ...]
    rows: tuple[int, int]
    cols: tuple[int, int] | None = None
    fallback: str | None = None

    @property
    def out_shape(self) -> tuple[int, ...]:
        r = self.rows[1] - self.rows[0]
        if self.cols is None:
            return (r, *self.shape[1:])
        return (r, self.cols[1] - self.cols[0])

    @property
    def numel(self) -> int:
        n = 1
        for d in self.out_shape:
            n *= d
        return n

    def scale_shape(self, recipe: str) -> tuple[int, int]:
        """Shape of this piece's scales: the blocks (or rows) its rows and columns cover."""
        r0, r1 = self.rows
        c0, c1 = self.cols if self.cols is not None else (0, self.shape[1])
        if recipe == "block128":
            return (cdiv(r1, BLOCK) - r0 // BLOCK, cdiv(c1, BLOCK) - c0 // BLOCK)
        return (r1 - r0, 1)


@dataclass(frozen=True)
class OutTensor:
    """One tensor of a checkpoint (and, when quantised, its scales)."""

    name: str
    shape: tuple[int, ...]
    role: ParamRole
    dtype: DType  # the unquantised dtype the graph gives it
    pieces: tuple[Piece, ...]
    recipe: str | None = None
    scale_name: str | None = None
    scale_shape: tuple[int, ...] | None = None
    param: str = ""  # the IR parameter (full name) it is cut from


def ranks(graph: Graph) -> list[Coords | None]:
    """The ranks with distinct weights (data-parallel replicas are identical), as mesh
    coordinates; `[None]` for a graph without a shard plan."""
    if not graph.attrs.mesh:
        return [None]
    m = mesh_of(graph)
    return [
        {"pp": s, "ep": e, "tp": t}
        for s, e, t in itertools.product(range(m["pp"]), range(m["ep"]), range(m["tp"]))
    ]


def rank_dir(coords: Coords) -> str:
    return f"pp{coords['pp']}-ep{coords['ep']}-tp{coords['tp']}"


def plan_checkpoint(graph: Graph, coords: Coords | None = None) -> list[OutTensor]:
    """The tensors of the checkpoint of `graph` held by the rank at `coords` (all of them when
    None), in graph order."""
    fused = graph.attrs.weight_layout == "fused"
    ctx = _Context(graph, coords)
    out: list[OutTensor] = []
    for node in graph.nodes:
        if coords is not None and stage_of(node) != coords["pp"]:
            continue
        for p in node.params:
            if p.role is ParamRole.SCALE or not p.attrs.checkpoint:
                continue
            groups = ctx.pieces(node, p)
            made = _fused_tensor(ctx, node, p, groups) if fused else _hf_tensors(ctx, p, groups)
            out += [replace(t, param=f"{node.name}.{p.name}") for t in made]
    return out


def unquantized_modules(graph: Graph) -> list[str]:
    """Checkpoint module names of the GEMM-like weights left in high precision (for the
    `modules_to_not_convert` / `ignore` lists of a quantization_config)."""
    n_layers = graph.attrs.num_layers
    out: dict[str, None] = {}
    roles = (ParamRole.WEIGHT, ParamRole.EXPERT, ParamRole.ROUTER, ParamRole.OUTPUT, ParamRole.EMBEDDING)
    for fqn, _, p in graph.params():
        if p.role not in roles or p.attrs.quant is not None or not p.attrs.checkpoint:
            continue
        name = hf_name(fqn, n_layers)
        module = name.rsplit(".", 1)[0] if p.role is ParamRole.EXPERT else name.removesuffix(".weight")
        out[module] = None
    return list(out)


def resolve_tie(params: dict[str, Param], fqn: str) -> str:
    """Follow `tied_to` to the parameter that owns the storage (ties may chain)."""
    seen = {fqn}
    while (tied := params[fqn].tied_to) is not None:
        if tied not in params:
            raise ValueError(f"{fqn} is tied to {tied}, which is not a parameter of the graph")
        if tied in seen:
            raise ValueError(f"parameter ties form a cycle through {tied}")
        seen.add(tied)
        fqn = tied
    return fqn


class _Context:
    def __init__(self, graph: Graph, coords: Coords | None) -> None:
        self.graph, self.coords = graph, coords
        self.mesh = mesh_of(graph)
        self.n_layers = graph.attrs.num_layers
        self.model_dtype = graph.attrs.dtype
        self.params = {fqn: p for fqn, _, p in graph.params()}

    def name(self, ir_name: str) -> str:
        return hf_name(ir_name, self.n_layers)

    def pieces(self, node: Node, p: Param) -> list[list[Piece]]:
        """Per expert (one group for non-expert parameters), the pieces this rank holds."""
        full = f"{node.name}.{p.name}"
        specs = {s.axis: s for s in shard_specs(p)} if self.coords is not None else {}
        lead = 1 if p.role is ParamRole.EXPERT else 0
        if p.role is ParamRole.EXPERT:
            prefix, kind = full.rsplit(".", 1)
            prefix = self.name(prefix)
            half = p.shape[1] // 2
            segments: tuple[int, ...] = (half, half) if kind == "gate_up_proj" else (p.shape[1],)
            projs = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
            ep = specs.get("ep")
            experts = ep.index[self._rank("ep")] if ep is not None else tuple(range(p.shape[0]))
            names = [[f"{prefix}.{e}.{proj}.weight" for proj in projs] for e in experts]
        else:
            fused = p.attrs.fused
            segments = p.attrs.segments if fused else (p.shape[0],)
            names = [[self.name(f"{node.name}.{c}") for c in fused] if fused else [self.name(full)]]
        fallback = self.name(resolve_tie(self.params, full)) if p.tied_to else None
        rows = [(0, s) for s in segments]
        cols = (0, p.shape[-1]) if len(p.shape) - lead == 2 else None
        tp = specs.get("tp")
        if tp is not None and tp.dim == lead:
            rows = tp.segment_ranges(self.mesh["tp"], self._rank("tp"))
        elif tp is not None and tp.dim == lead + 1:
            cols = tp.segment_ranges(self.mesh["tp"], self._rank("tp"))[0]
        tail = p.shape[lead + 1 :]
        return [
            [
                Piece(n, (seg, *tail), r, cols, fallback)
                for n, seg, r in zip(group, segments, rows, strict=True)
            ]
            for group in names
        ]

    def _rank(self, axis: str) -> int:
        assert self.coords is not None
        return self.coords[axis]

    def shape(self, p: Param) -> tuple[int, ...]:
        if self.coords is None:
            return p.shape
        return local_shape(p, self.mesh, self.coords)

    def dtype(self, p: Param) -> DType:
        return self.model_dtype if p.attrs.quant is not None else p.dtype


def _fused_tensor(ctx: _Context, node: Node, p: Param, groups: list[list[Piece]]) -> list[OutTensor]:
    name = ctx.name(f"{node.name}.{p.name}")
    pieces = tuple(pc for g in groups for pc in g)
    shape = ctx.shape(p)
    recipe = p.attrs.quant
    if recipe is None:
        return [OutTensor(name, shape, p.role, ctx.dtype(p), pieces)]
    per_group = [pc.scale_shape(recipe) for pc in groups[0]]
    scale = (*shape[:-2], sum(r for r, _ in per_group), per_group[0][1])
    return [OutTensor(name, shape, p.role, ctx.dtype(p), pieces, recipe, name + scale_suffix(recipe), scale)]


def _hf_tensors(ctx: _Context, p: Param, groups: list[list[Piece]]) -> list[OutTensor]:
    recipe = p.attrs.quant
    out = []
    for pc in (pc for g in groups for pc in g):
        if recipe is None:
            out.append(OutTensor(pc.source, pc.out_shape, p.role, ctx.dtype(p), (pc,)))
        else:
            scale = pc.scale_shape(recipe)
            suffix = scale_suffix(recipe)
            out.append(
                OutTensor(
                    pc.source, pc.out_shape, p.role, ctx.dtype(p), (pc,), recipe, pc.source + suffix, scale
                )
            )
    return out
