"""quantize-fp8{recipe,exclude,strict,serving}: mark GEMM weights FP8 E4M3 and give each its scale
parameter.

Quantised: every GEMM weight of attention, dense MLPs, shared and routed experts. Never
quantised (reference §1.2, §6.11): embeddings, the output head and the MTP `shared_head`, the
router and its bias, norms, biases, and the MTP `eh_proj` (TensorRT-LLM's FP8 block loader
expects it in BF16). `exclude` adds fnmatch patterns, separated by `|`, matched against module
and parameter names in both glmc's spelling (`model.mtp.0.self_attn`) and the checkpoint's
(`model.layers.92.self_attn`). q/k/v and gate/up are quantised all or none: vLLM and SGLang fuse
each group into one layer with one quantisation method.

The pass only annotates: a weight's dtype becomes f8e4m3 with `quant=<recipe>`, and a `scale`
parameter (`<name>_scale_inv` for block128, `<name>_scale` for channel; fp32) follows it, split
over the mesh like its weight. Values are computed by the weight transform (export/hf/fp8.py).
Runs after shard, because block scales can only be split where tensor-parallel pieces are
128-aligned; this pass checks that.

Serving constraint (block128): vLLM (`validate_fp8_block_shape`), SGLang and TensorRT-LLM refuse
a block-quantised linear whose per-rank output or input size is not a multiple of 128 (merged
q/k/v and gate/up layers: every component). By default (`serving=true`) such weights, judged
after the plan's tensor-parallel split, stay high precision: the param carries `fp8_kept=<why>`,
the graph lists them under `fp8_kept` (graph.txt is the pass report), and the checkpoint's
`quantization_config.modules_to_not_convert` names them, which all three stacks read. A q/k/v or
gate/up group is kept whole, since the stacks fuse it into one layer with one method.
`strict=true` refuses such a weight instead, naming it and its size; `serving=false` quantises
every GEMM weight (transformers and glmc load any size) and only refuses TP pieces glmc itself
cannot split block scales for. GLM-4.5 has no such weight; GLM-4.5-Air's dense MLP (10944 =
85.5 x 128) and the small presets (hidden 64/256 splits) do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import ClassVar, Literal

from glmc.ir import (
    DType,
    Graph,
    Node,
    Param,
    ParamAttrs,
    ParamRole,
    ShardSpec,
    mesh_of,
    shard_specs,
    with_shards,
)
from glmc.ir.naming import hf_name
from glmc.ir.quant import (
    ACTIVATION_SCHEME,
    BLOCK,
    row_segments,
    scale_cols,
    scale_param_name,
    scale_shape,
    segment_scale_rows,
)

from .base import Pass, PassError

DEFAULT_EXCLUDE = ("*.eh_proj",)
_GROUPS = (("q_proj.", "k_proj.", "v_proj."), ("gate_proj.", "up_proj."))


@dataclass(frozen=True)
class QuantizeFP8(Pass):
    name: ClassVar[str] = "quantize-fp8"
    # Fused weights are quantised per component; sharded weights per 128-aligned piece.
    after: ClassVar[tuple[str, ...]] = ("fuse-moe", "shard")

    recipe: Literal["block128", "channel"] = "block128"
    exclude: str = ""
    strict: bool = False  # refuse weights the serving stacks cannot run, instead of keeping them BF16
    serving: bool = True  # apply the serving stacks' 128 rule (block128 only)

    def patterns(self) -> list[str]:
        return [p.strip() for p in self.exclude.split("|") if p.strip()]

    def apply(self, graph: Graph) -> Graph:
        if graph.attrs.quantization is not None:
            raise PassError(f"quantize-fp8: the graph is already quantised ({graph.attrs.quantization})")
        n_layers = graph.attrs.num_layers
        user = self.patterns()
        used: set[str] = set()
        nodes = []
        kept: list[str] = []
        for n in graph.nodes:
            chosen = [p for p in n.params if _candidate(p) and not self._excluded(n, p, n_layers, user, used)]
            _check_groups(n, {p.name for p in chosen})
            names = {p.name for p in chosen}
            if self.recipe == "block128" and self.serving and chosen:
                why = self._serving_misfits(graph, n, chosen, n_layers)
                names -= set(why)
                n = replace(n, params=tuple(p.with_attrs(fp8_kept=why[p.name]) if p.name in why else p
                                            for p in n.params))  # fmt: skip
                kept += [f"{n.name}.{name}" for name in why]
            if names:
                n = self._quantize(graph, n, names)
            nodes.append(n)
        unused = [p for p in user if p not in used]
        if unused:
            raise PassError(
                f"quantize-fp8: exclude pattern {unused[0]!r} matches no GEMM weight; patterns match names "
                "such as model.layers.3.mlp.shared_experts.* or *.self_attn.o_proj"
            )
        return graph.replace_nodes(nodes).with_attrs(quantization=self.recipe, fp8_kept=tuple(kept))

    def _serving_misfits(self, g: Graph, n: Node, chosen: list[Param], n_layers: int) -> dict[str, str]:
        """Chosen weights whose per-rank block layout the serving stacks refuse -> why; a q/k/v or
        gate/up group is kept whole. With `strict`, the first such weight is an error instead."""
        why: dict[str, str] = {}
        for p in chosen:
            bad = _misfit(g, p)
            if bad is None:
                continue
            if self.strict:
                raise PassError(
                    f"quantize-fp8{{strict=true}}: {hf_name(f'{n.name}.{p.name}', n_layers)} has {bad}, not a "
                    f"multiple of {BLOCK}: vLLM, SGLang and TensorRT-LLM refuse such block-FP8 weights; "
                    "without strict it stays BF16 (listed in modules_to_not_convert), or exclude it"
                )
            why[p.name] = bad
        for group in _GROUPS:
            members = [p.name for p in chosen if p.name.startswith(group) and p.name.endswith(".weight")]
            hit = [m for m in members if m in why]
            for m in members:
                if hit and m not in why:
                    why[m] = f"kept with {hit[0].removesuffix('.weight')} ({why[hit[0]]})"
        return why

    def _excluded(self, n: Node, p: Param, n_layers: int, user: list[str], used: set[str]) -> bool:
        names = _spellings(f"{n.name}.{p.name}", n_layers)
        if any(fnmatchcase(x, pat) for x in names for pat in DEFAULT_EXCLUDE):
            return True
        hit = [pat for pat in user if any(fnmatchcase(x, pat) for x in names)]
        used.update(hit)
        return bool(hit)

    def _quantize(self, g: Graph, n: Node, chosen: set[str]) -> Node:
        params: list[Param] = []
        for p in n.params:
            if p.name not in chosen:
                params.append(p)
                continue
            _check_alignment(g, n, p, self.recipe)
            q = replace(p, dtype=DType.F8E4M3).with_attrs(quant=self.recipe)
            scale = Param(
                scale_param_name(p.name, self.recipe),
                scale_shape(p, self.recipe),
                DType.F32,
                ParamRole.SCALE,
                attrs=ParamAttrs(of=p.name),
            )
            specs = _scale_specs(p, self.recipe)
            params += [q, with_shards(scale, specs) if specs else scale]
        return replace(n, params=tuple(params)).with_attrs(act_quant=ACTIVATION_SCHEME[self.recipe])


def _candidate(p: Param) -> bool:
    return p.role in (ParamRole.WEIGHT, ParamRole.EXPERT) and len(p.shape) >= 2


def _spellings(full: str, n_layers: int) -> list[str]:
    """A parameter's full name and module name, in glmc's and the checkpoint's spelling."""
    names = list(dict.fromkeys([full, hf_name(full, n_layers)]))
    return names + [x.removesuffix(".weight") for x in names if x.endswith(".weight")]


def _check_groups(n: Node, chosen: set[str]) -> None:
    for group in _GROUPS:
        members = [p.name for p in n.params if p.name.startswith(group) and p.name.endswith(".weight")]
        picked = [m for m in members if m in chosen]
        if picked and len(picked) != len(members):
            left = sorted(set(members) - set(picked))
            raise PassError(
                f"quantize-fp8: {n.name}: exclude leaves {', '.join(picked)} quantised but not {', '.join(left)}; "
                "serving stacks fuse q/k/v and gate/up into one layer, so exclude all of a group or none"
            )


def _per_rank(g: Graph, p: Param) -> tuple[list[tuple[int, str]], int, str]:
    """A GEMM weight's output sizes (one per fused component) and input size on one rank, each
    with the axes that split it ("" when whole)."""
    mesh = mesh_of(g)
    rows_dim, cols_dim = len(p.shape) - 2, len(p.shape) - 1
    rows = [(seg, "") for seg in row_segments(p)]
    cols, cols_by = p.shape[-1], ""
    for s in shard_specs(p):
        if s.index or s.dim not in (rows_dim, cols_dim):
            continue
        if s.dim == rows_dim:
            rows = [(seg // (mesh[s.axis] // rep), f"{s.axis}={mesh[s.axis]}")
                    for seg, rep in zip(s.segments, s.replicas, strict=True)]  # fmt: skip
        else:
            cols, cols_by = cols // mesh[s.axis], f"{s.axis}={mesh[s.axis]}"
    return rows, cols, cols_by


def _misfit(g: Graph, p: Param) -> str | None:
    """Why `p` breaks the serving stacks' block128 rule (None when every per-rank size fits)."""
    rows, cols, cols_by = _per_rank(g, p)
    for size, by in rows:
        if size % BLOCK:
            return f"output size {size}" + (f" per rank ({by})" if by else "")
    if cols % BLOCK:
        return f"input size {cols}" + (f" per rank ({cols_by})" if cols_by else "")
    return None


def _check_alignment(g: Graph, n: Node, p: Param, recipe: str) -> None:
    """Block scales split with their weight only if every tensor-parallel piece is whole blocks."""
    if recipe != "block128":
        return
    mesh = mesh_of(g)
    rows_dim, cols_dim = len(p.shape) - 2, len(p.shape) - 1
    for s in shard_specs(p):
        if s.index or s.dim not in (rows_dim, cols_dim):
            continue
        for seg, rep in zip(s.segments, s.replicas, strict=True):
            chunks = mesh[s.axis] // rep
            piece = seg // chunks
            if chunks > 1 and piece % BLOCK:
                what = "rows" if s.dim == rows_dim else "columns"
                raise PassError(
                    f"quantize-fp8: recipe=block128 needs {BLOCK}-aligned tensor-parallel pieces, but "
                    f"{s.axis}={mesh[s.axis]} splits the {what} of {n.name}.{p.name} into pieces of {piece}; "
                    "use recipe=channel or a smaller tp"
                )


def _scale_specs(p: Param, recipe: str) -> list[ShardSpec]:
    """The weight's placement, restated in units of scale rows and columns."""
    out = []
    rows_dim, cols_dim = len(p.shape) - 2, len(p.shape) - 1
    for s in shard_specs(p):
        if s.index or s.dim < rows_dim:
            out.append(s)
        elif s.dim == rows_dim:
            segs = tuple(segment_scale_rows(x, recipe) for x in s.segments)
            out.append(ShardSpec(s.axis, s.dim, segs, s.replicas))
        elif recipe == "block128" and s.dim == cols_dim:
            out.append(ShardSpec(s.axis, s.dim, (scale_cols(p.shape[-1], recipe),), s.replicas))
        # channel scales have one column: a column split leaves them replicated.
    return out
