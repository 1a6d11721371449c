"""Typed attributes: one frozen record per op, one for parameters, one for the graph.

A node's `attrs` is the record of its op (`AttentionAttrs` for `attention`, ...). A misspelt or
missing field, a value of the wrong type, or values that contradict each other (`top_k` above
`num_experts`) fail when the record is made, with an `AttrError` naming the op and the field, so
a pass or a lowering bug stops where it is written instead of in a reader far away.

Reading: fields every node has (`layer`, `stage`) as `n.attrs.layer`; op-specific fields through
the op's record class, which checks the op and gives the type checker the record's type:
`AttentionAttrs.of(n).num_heads`. A shared base reads every op that has its fields:
`ExpertsAttrs.of(n)` reads `experts` and `moe` nodes, `RouterAttrs.of(n)` `router` and `moe`,
`FfnAttrs.of(n)` `mlp`, `experts` and `moe`. Graph and parameter attributes are one record each:
`g.attrs.num_layers`, `p.attrs.quant`.

Changing: `n.with_attrs(stage=1)`, `p.with_attrs(quant="block128")` (keyword names checked,
None resets a field to its default), or `dataclasses.replace` on the record; both validate again.

Printing (ir/printer.py) is the old key/value form: fields in name order, a field at its
default omitted (defaults mean "absent": `layer=None`, `shard=()`, `checkpoint=True`).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Literal, Protocol, Self, TypeAlias, TypeVar, dataclass_transform

from .dtypes import DType
from .errors import AttrError
from .ops import Op
from .shardspec import MESH_AXES, ShardSpec


class _Node(Protocol):
    """What `Record.of` reads of a node (graph.py's Node, which imports this module)."""

    @property
    def name(self) -> str: ...
    @property
    def op(self) -> Op: ...
    @property
    def attrs(self) -> Any: ...


MeshAxis: TypeAlias = Literal["pp", "dp", "ep", "tp"]
Recipe: TypeAlias = Literal["block128", "channel"]

R = TypeVar("R", bound="Record")

# op -> its record class; filled by @record(op).
_BY_OP: dict[Op, type[NodeAttrs]] = {}


@dataclass_transform(kw_only_default=True, frozen_default=True)
def record(op: Op | None = None) -> Callable[[type[R]], type[R]]:
    """Make `cls` a frozen, keyword-only dataclass whose constructor rejects unknown and missing
    fields by name, and (with `op`) the record of that op."""

    def wrap(cls: type[R]) -> type[R]:
        cls = dataclass(frozen=True, kw_only=True)(cls)
        cls.op = op
        generated = cls.__init__
        names = frozenset(f.name for f in fields(cls))
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]

        def init(self: Any, **kwargs: Any) -> None:
            # The generated __init__ would say "unexpected keyword argument"; name the op instead.
            for k in kwargs:
                if k not in names:
                    raise AttrError(
                        f"{cls.label()}: unknown attribute {k!r} (known: {', '.join(sorted(names))})"
                    )
            for k in required:
                if k not in kwargs:
                    raise AttrError(f"{cls.label()}: missing attribute {k!r}")
            generated(self, **kwargs)

        init.__doc__ = generated.__doc__
        cls.__init__ = init  # type: ignore[method-assign]
        if op is not None:
            if op in _BY_OP:
                raise TypeError(f"op {op} already has record {_BY_OP[op].__name__}")
            _BY_OP[op] = cls  # type: ignore[assignment]
        return cls

    return wrap


@dataclass(frozen=True)
class Record:
    """Base of every attribute record: field types checked on construction, printable items."""

    op: ClassVar[Op | None] = None

    @classmethod
    def label(cls) -> str:
        """What error messages call the owner of these attributes: the op, or `param` / `graph`."""
        return str(cls.op) if cls.op is not None else cls.__name__.removesuffix("Attrs").lower()

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            value = getattr(self, name)
            if hint.float_ok and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))  # an int where a float is typed
            elif not _conforms(value, hint.type):
                raise AttrError(
                    f"{self.label()}: attribute {name!r} must be {_describe(hint.type)}, got {value!r}"
                )
        problem = self.problem()
        if problem is not None:
            raise AttrError(f"{self.label()}: {problem}")

    def problem(self) -> str | None:
        """What contradicts what among the fields (overridden per record), or None."""
        return None

    def items(self) -> tuple[tuple[str, Any], ...]:
        """The present fields as sorted (name, value) pairs: the printed form."""
        out = []
        for f, default in _defaults(type(self)):
            v = getattr(self, f)
            if default is MISSING or v != default:
                out.append((f, v))
        return tuple(sorted(out))

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name, or `default` where the record has no such field or it is absent."""
        for f, d in _defaults(type(self)):
            if f == name:
                v = getattr(self, f)
                return default if d is not MISSING and v == d else v
        return default

    def updated(self, **updates: Any) -> Self:
        """A copy with `updates` applied (None resets a field to its default); validated again."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        defaults = dict(_defaults(type(self)))
        for k, v in updates.items():
            if k not in values:
                raise AttrError(
                    f"{self.label()}: unknown attribute {k!r} (known: {', '.join(sorted(values))})"
                )
            if v is None and defaults[k] is not MISSING:
                v = defaults[k]
            values[k] = v
        return type(self)(**values)


# ---- nodes --------------------------------------------------------------------------------------


@record()
class NodeAttrs(Record):
    """Fields every node may carry: its decoder layer (MTP layers count on from num_layers)
    and, after `shard`, its pipeline stage."""

    layer: int | None = None
    stage: int | None = None

    @classmethod
    def of(cls, n: _Node) -> Self:
        """`n`'s attributes as this record type; an AttrError if `n`'s op has other fields."""
        if not isinstance(n.attrs, cls):
            raise AttrError(f"node {n.name} is {n.op}; it has no {cls.__name__} attributes")
        return n.attrs

    def problem(self) -> str | None:
        if self.layer is not None and self.layer < 0:
            return f"layer {self.layer} is negative"
        if self.stage is not None and self.stage < 0:
            return f"stage {self.stage} is negative"
        return None


@record(Op.INPUT)
class InputAttrs(NodeAttrs):
    name: str
    shift: int | None = None  # MTP input k reads the tokens shifted by k + 1


@record(Op.OUTPUT)
class OutputAttrs(NodeAttrs):
    name: str


@record()
class VocabAttrs(NodeAttrs):
    """A [vocab, dim] weight: the embedding and the output head."""

    vocab: int
    dim: int


@record(Op.EMBED)
class EmbedAttrs(VocabAttrs):
    pass


@record(Op.LM_HEAD)
class LmHeadAttrs(VocabAttrs):
    pass


@record(Op.RMSNORM)
class RmsNormAttrs(NodeAttrs):
    dim: int
    eps: float


@record(Op.ADD)
class AddAttrs(NodeAttrs):
    pass


@record(Op.CONCAT)
class ConcatAttrs(NodeAttrs):
    pass


@record()
class GemmAttrs(NodeAttrs):
    """Ops holding GEMM weights; quantize-fp8 records how their activations are quantised."""

    act_quant: Literal["dynamic_1x128", "dynamic_per_token"] | None = None


@record(Op.LINEAR)
class LinearAttrs(GemmAttrs):
    in_features: int
    out_features: int


@record(Op.ATTENTION)
class AttentionAttrs(GemmAttrs):
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    rope_scaling: str | None = None  # JSON of the spec's rope scaling, sorted keys
    qk_norm: bool
    qkv_bias: bool
    eps: float

    def problem(self) -> str | None:
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            return f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}"
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            return f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]"
        return super().problem()


@record()
class FfnAttrs(GemmAttrs):
    """SwiGLU feed-forward sizes: dense MLPs, shared experts, routed experts, MoE."""

    hidden: int
    intermediate_size: int
    activation: Literal["silu"]


@record(Op.MLP)
class MlpAttrs(FfnAttrs):
    pass


@record(Op.ROUTER)
class RouterAttrs(NodeAttrs):
    layer: int  # routing (and the expert maps of expert parallelism) is per decoder layer
    hidden: int
    num_experts: int
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    scoring: Literal["sigmoid"]

    def problem(self) -> str | None:
        e, g, tg = self.num_experts, self.n_group, self.topk_group
        if self.top_k > e:
            return f"top_k {self.top_k} exceeds num_experts {e}"
        if g <= 0 or e % g or tg > g:
            return f"bad grouping: num_experts {e}, n_group {g}, topk_group {tg}"
        return super().problem()


@record(Op.EXPERTS)
class ExpertsAttrs(FfnAttrs):
    layer: int  # routed experts are placed per decoder layer
    num_experts: int
    top_k: int

    def problem(self) -> str | None:
        if self.top_k > self.num_experts:
            return f"top_k {self.top_k} exceeds num_experts {self.num_experts}"
        return super().problem()


@record(Op.MOE)
class MoeAttrs(ExpertsAttrs, RouterAttrs):
    """fuse-moe's node: the routed experts' fields, the router's, and the shared expert's
    total intermediate size (0 without one)."""

    shared_intermediate_size: int


@record()
class CollectiveAttrs(NodeAttrs):
    """The mesh axis a collective runs over and what it moves (each op narrows `kind`)."""

    axis: MeshAxis
    kind: str


@record(Op.ALL_REDUCE)
class AllReduceAttrs(CollectiveAttrs):
    kind: Literal["sum"]


@record(Op.ALL_GATHER)
class AllGatherAttrs(CollectiveAttrs):
    kind: Literal["vocab"]
    dim: int  # the gathered dimension (-1: the vocabulary-parallel logits)


@record(Op.ALL_TO_ALL)
class AllToAllAttrs(CollectiveAttrs):
    kind: Literal["dispatch", "combine"]


@record(Op.SEND_RECV)
class SendRecvAttrs(CollectiveAttrs):
    kind: Literal["activations"]
    src: int  # pipeline stage sending
    dst: int  # pipeline stage receiving


def record_of(op: Op) -> type[NodeAttrs]:
    """The record class of `op`'s attributes."""
    return _BY_OP[op]


# ---- parameters and graphs -----------------------------------------------------------------------


@record()
class ParamAttrs(Record):
    """Annotations passes put on a parameter."""

    # Not written to checkpoints (the lm_head a tied model keeps only in memory).
    checkpoint: bool = True
    # fuse-moe: the parameters concatenated into this one and their row counts.
    fused: tuple[str, ...] = ()
    segments: tuple[int, ...] = ()
    # shard: how the parameter is split over the mesh (placement.py).
    shard: tuple[ShardSpec, ...] = ()
    # quantize-fp8: the recipe of an FP8 weight; on a scale parameter, the weight it scales;
    # on a weight left in high precision, why.
    quant: Recipe | None = None
    of: str | None = None
    fp8_kept: str | None = None

    def problem(self) -> str | None:
        if self.segments and len(self.segments) != len(self.fused):
            return f"segments {list(self.segments)} do not match fused {list(self.fused)}"
        return None


@record()
class GraphAttrs(Record):
    """The model facts lowering records, and what the passes decided."""

    dtype: DType
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_dense_layers: int
    num_mtp_layers: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    initializer_range: float
    # Set by the pipeline and the passes:
    passes: tuple[str, ...] = ()  # the pipeline's passes, as spelled
    weight_layout: Literal["fused"] | None = None  # fuse-moe; None: the Hugging Face layout
    mesh: tuple[tuple[MeshAxis, int], ...] = ()  # shard: axis sizes, outermost first
    pp_stages: tuple[tuple[int, int], ...] = ()  # shard: first and last trunk layer per stage
    ep_slots: int | None = None  # shard: expert slots per EP rank
    quantization: Recipe | None = None  # quantize-fp8
    fp8_kept: tuple[str, ...] = ()  # quantize-fp8: weights left in high precision

    def problem(self) -> str | None:
        axes = [a for a, _ in self.mesh]
        if self.mesh and (axes != list(MESH_AXES) or any(s < 1 for _, s in self.mesh)):
            return f"mesh {self.mesh} must give every axis of {MESH_AXES}, in that order, a size >= 1"
        return None


# ---- field type checks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hint:
    type: Any
    float_ok: bool  # typed float (or float | None): an int is accepted and stored as a float


_HINTS: dict[type[Record], dict[str, _Hint]] = {}
_DEFAULTS: dict[type[Record], tuple[tuple[str, Any], ...]] = {}


def _hints(cls: type[Record]) -> dict[str, _Hint]:
    """Each field's resolved type, once per record class (records are made for every node)."""
    out = _HINTS.get(cls)
    if out is None:
        hints = typing.get_type_hints(cls)
        out = {}
        for f in fields(cls):
            t = hints[f.name]
            out[f.name] = _Hint(t, t is float or (_is_union(t) and float in typing.get_args(t)))
        _HINTS[cls] = out
    return out


def _defaults(cls: type[Record]) -> tuple[tuple[str, Any], ...]:
    out = _DEFAULTS.get(cls)
    if out is None:
        out = _DEFAULTS[cls] = tuple((f.name, f.default) for f in fields(cls))
    return out


def _is_union(t: Any) -> bool:
    return typing.get_origin(t) in (types.UnionType, typing.Union)


def _conforms(v: Any, t: Any) -> bool:
    origin = typing.get_origin(t)
    if origin is Literal:
        return any(v == a and type(v) is type(a) for a in typing.get_args(t))
    if _is_union(t):
        return any(_conforms(v, a) for a in typing.get_args(t))
    if origin is tuple:
        args = typing.get_args(t)
        if not isinstance(v, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(x, args[0]) for x in v)
        return len(v) == len(args) and all(_conforms(x, a) for x, a in zip(v, args, strict=True))
    if t is type(None):
        return v is None
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, float)
    return isinstance(v, t)


def _describe(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(t))
    if _is_union(t):
        return " or ".join(_describe(a) for a in typing.get_args(t))
    if origin is tuple:
        args = typing.get_args(t)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of ({_describe(args[0])})"
        return "a tuple (" + ", ".join(_describe(a) for a in args) + ")"
    if t is type(None):
        return "None"
    return getattr(t, "__name__", str(t))
