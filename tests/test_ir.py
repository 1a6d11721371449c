from dataclasses import replace
from pathlib import Path

import pytest

from glmc import presets
from glmc.ir import (
    AllReduceAttrs,
    AttentionAttrs,
    AttrError,
    DType,
    ExpertsAttrs,
    Graph,
    GraphAttrs,
    InputAttrs,
    LinearAttrs,
    MoeAttrs,
    Node,
    Op,
    OutputAttrs,
    Param,
    ParamAttrs,
    ParamRole,
    RouterAttrs,
    ShardSpec,
    VerifyError,
    count_params,
    flops_per_token,
    format_graph,
    kv_cache_bytes_per_token,
    rewrite,
    verify,
)
from glmc.ir.printer import format_param
from glmc.lower import lower

GOLDEN = Path(__file__).parent / "golden"


def test_glm45_param_counts_follow_the_paper_rule():
    c = count_params(lower(presets.get("glm-4.5")))
    assert c.total == 355_234_006_336
    assert c.active == 32_482_313_536
    assert c.checkpoint == 358_337_791_296  # MTP embed/head copies included
    assert c.embedding == c.output == 151552 * 5120


def test_glm45_air_param_counts():
    c = count_params(lower(presets.get("glm-4.5-air")))
    assert (c.total, c.active) == (107_985_796_864, 12_481_494_784)
    assert c.checkpoint == 110_468_824_832
    # the published "106B" is the trunk without the MTP layer (reference §4.2)
    assert c.total - c.mtp == 105_610_737_280


def test_param_counts_by_hand_on_tiny():
    s = presets.get("glm-tiny")
    h, v, d, nh, nkv = 64, 512, 32, 4, 2
    att = h * nh * d + 2 * h * nkv * d + nh * d * h + (nh * d + 2 * nkv * d) + 2 * d
    dense = 3 * h * 128
    expert = 3 * h * 32
    router = 8 * h + 8
    moe_total = att + 2 * h + 9 * expert + router
    moe_active = att + 2 * h + 3 * expert + router  # top-2 + shared
    mtp_extra = 2 * h + 2 * h * h + h
    c = count_params(lower(s))
    assert c.total == (att + dense + 2 * h) + 2 * moe_total + h + moe_total + mtp_extra
    assert c.active == (att + dense + 2 * h) + 2 * moe_active + h + moe_active + mtp_extra
    assert c.checkpoint == c.total + 4 * v * h


def test_tied_embeddings_are_stored_once():
    s = presets.get("glm-tiny").model_copy(update={"tie_word_embeddings": True})
    c = count_params(lower(s))
    untied = count_params(lower(presets.get("glm-tiny")))
    assert c.in_memory == untied.in_memory - 512 * 64
    assert c.checkpoint == untied.checkpoint - 512 * 64


def test_kv_cache_and_flops():
    g = lower(presets.get("glm-4.5"))
    kv = kv_cache_bytes_per_token(g)
    assert kv["trunk"] == 92 * 2 * 8 * 128 * 2 and kv["mtp"] == 2 * 8 * 128 * 2
    f = flops_per_token(g, seq_len=1)
    # at one token of context: 2 x (active GEMM params of the trunk + head) + 4 n_h d per layer
    c = count_params(g)
    trunk_active = c.active - 401_939_872  # MTP layer active (reference §4.1)
    router_bias = 89 * 160
    biases = 92 * (96 * 128 + 2 * 8 * 128)
    norms = 92 * (2 * 5120 + 2 * 128) + 5120
    gemm = trunk_active - router_bias - biases - norms + 151552 * 5120
    assert f["forward"] == 2 * gemm + 92 * 4 * 96 * 128
    assert f["training"] == 3 * (f["forward"] + f["mtp_forward"])


def test_golden_text_of_tiny_graph():
    text = format_graph(lower(presets.get("glm-tiny")))
    golden = GOLDEN / "glm-tiny.ir"
    assert text == golden.read_text(), "regenerate with: python -m tests.regen_golden (and review the diff)"


def test_printer_is_deterministic_and_one_line_per_node():
    g = lower(presets.get("glm-tiny"))
    text = format_graph(g)
    assert text == format_graph(lower(presets.get("glm-tiny")))
    assert len(text.splitlines()) == len(g.nodes) + 1


def test_graph_is_frozen_and_replace_makes_copies():
    g = lower(presets.get("glm-tiny"))
    n = g.nodes[1]
    with pytest.raises(AttributeError):
        n.name = "x"  # type: ignore[misc]
    m = n.with_attrs(layer=7)
    assert m.attrs.layer == 7 and n.attrs.layer is None


_GRAPH_ATTRS = GraphAttrs(
    dtype=DType.F32,
    vocab_size=4,
    hidden_size=4,
    num_layers=1,
    num_dense_layers=1,
    num_mtp_layers=0,
    max_position_embeddings=8,
    tie_word_embeddings=False,
    initializer_range=0.02,
)


def _tiny_graph() -> Graph:
    return lower(presets.get("glm-tiny"))


def test_verifier_rejects_undefined_input():
    g = _tiny_graph()
    nodes = list(g.nodes)
    nodes[2] = replace(nodes[2], inputs=("nowhere",))
    with pytest.raises(VerifyError, match="nowhere"):
        verify(g.replace_nodes(nodes))


def test_verifier_rejects_wrong_param_shape():
    g = _tiny_graph()
    att = g.node("model.layers.0.self_attn")
    params = tuple(replace(p, shape=(1, 1)) if p.name == "q_proj.weight" else p for p in att.params)
    bad = rewrite(g, lambda n: replace(n, params=params) if n.name == att.name else None)
    with pytest.raises(VerifyError, match=r"model\.layers\.0\.self_attn: parameter q_proj\.weight has shape"):
        verify(bad)


def test_verifier_rejects_duplicates_and_missing_output():
    a = Node("a", Op.INPUT, attrs=InputAttrs(name="a"))
    with pytest.raises(VerifyError, match="duplicate node name"):
        verify(Graph("g", (a, a, Node("o", Op.OUTPUT, ("a",), attrs=OutputAttrs(name="o"))), _GRAPH_ATTRS))
    with pytest.raises(VerifyError, match="no output"):
        verify(Graph("g", (a,), _GRAPH_ATTRS))


def test_rewrite_forwards_renamed_outputs():
    w = Param("weight", (4, 4), DType.F32, ParamRole.WEIGHT)
    g = Graph(
        "g",
        (
            Node("x", Op.INPUT, attrs=InputAttrs(name="x")),
            Node("lin", Op.LINEAR, ("x",), (w,), LinearAttrs(in_features=4, out_features=4)),
            Node("out", Op.OUTPUT, ("lin",), attrs=OutputAttrs(name="out")),
        ),
        _GRAPH_ATTRS,
    )

    def split(n: Node):
        if n.name != "lin":
            return None
        return [replace(n, name="lin.a"), replace(n, name="lin.b", inputs=("lin.a",))]

    g2 = verify(rewrite(g, split))
    assert [n.name for n in g2.nodes] == ["x", "lin.a", "lin.b", "out"]
    assert g2.node("out").inputs == ("lin.b",)


def test_dtype_parse():
    assert DType.parse("torch.bfloat16") is DType.BF16
    assert DType.parse("float8_e4m3fn").itemsize == 1
    with pytest.raises(ValueError, match="unknown dtype"):
        DType.parse("int3")


# ---- typed attribute records ----------------------------------------------------------------


def _attention_fields() -> dict[str, object]:
    att = _tiny_graph().node("model.layers.0.self_attn")
    return {k: getattr(att.attrs, k) for k, _ in att.attrs.items()}


def test_misspelt_attribute_fails_at_construction_naming_op_and_field():
    fields = _attention_fields()
    fields["num_head"] = fields.pop("num_heads")
    with pytest.raises(AttrError, match=r"^attention: unknown attribute 'num_head'"):
        AttentionAttrs(**fields)  # type: ignore[arg-type]
    # Through a node, the message names the node too.
    n = _tiny_graph().node("model.layers.1.mlp.gate")
    with pytest.raises(
        AttrError, match=r"^node model\.layers\.1\.mlp\.gate: router: unknown attribute 'topk'"
    ):
        n.with_attrs(topk=2)
    with pytest.raises(AttrError, match=r"param weight: param: unknown attribute 'quantise'"):
        Param("weight", (4, 4), DType.F32, ParamRole.WEIGHT).with_attrs(quantise="block128")
    with pytest.raises(AttrError, match=r"graph g: graph: unknown attribute 'num_layer'"):
        Graph("g", (), _GRAPH_ATTRS).with_attrs(num_layer=2)


def test_missing_attribute_fails_at_construction():
    fields = _attention_fields()
    del fields["rotary_dim"]
    with pytest.raises(AttrError, match=r"^attention: missing attribute 'rotary_dim'"):
        AttentionAttrs(**fields)  # type: ignore[arg-type]
    with pytest.raises(AttrError, match=r"^node out: output: missing attribute 'name'"):
        Node("out", Op.OUTPUT, ("x",))


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("num_heads", "4", "int"),
        ("num_heads", 4.0, "int"),
        ("qk_norm", 1, "bool"),
        ("num_kv_heads", True, "int"),  # bool is an int subclass in Python, not an int here
        ("rope_theta", "1e6", "float"),
        ("act_quant", "dynamic", "'dynamic_1x128' or 'dynamic_per_token' or None"),
    ],
)
def test_wrong_type_fails_at_construction_naming_op_and_field(field, value, want):
    fields = _attention_fields() | {field: value}
    with pytest.raises(AttrError, match=rf"^attention: attribute '{field}' must be {want}, got "):
        AttentionAttrs(**fields)  # type: ignore[arg-type]


def test_wrong_record_for_the_op_fails_at_construction():
    att = _tiny_graph().node("model.layers.0.self_attn")
    with pytest.raises(AttrError, match=r"node x: takes MlpAttrs, got AttentionAttrs"):
        Node("x", Op.MLP, ("y",), (), att.attrs)
    with pytest.raises(
        AttrError, match=r"node model\.layers\.0\.self_attn is attention; it has no RouterAttrs"
    ):
        RouterAttrs.of(att)


def test_contradicting_fields_fail_at_construction():
    router = _tiny_graph().node("model.layers.1.mlp.gate")
    with pytest.raises(AttrError, match=r"router: top_k 9 exceeds num_experts 8"):
        router.with_attrs(top_k=9)
    with pytest.raises(AttrError, match=r"router: bad grouping: num_experts 8, n_group 3"):
        router.with_attrs(n_group=3)
    att = _tiny_graph().node("model.layers.0.self_attn")
    with pytest.raises(AttrError, match=r"attention: num_heads 4 not divisible by num_kv_heads 3"):
        att.with_attrs(num_kv_heads=3)
    with pytest.raises(AttrError, match=r"attention: rotary_dim 15 must be even"):
        att.with_attrs(rotary_dim=15)
    with pytest.raises(AttrError, match=r"attention: stage -1 is negative"):
        att.with_attrs(stage=-1)
    with pytest.raises(AttrError, match=r"all_reduce: attribute 'axis' must be 'pp' or 'dp' or 'ep' or 'tp'"):
        AllReduceAttrs(axis="xp", kind="sum")  # type: ignore[arg-type]


def test_records_read_typed_and_print_like_the_old_bag():
    g = _tiny_graph()
    assert g.attrs.num_layers == 3 and g.attrs.dtype is DType.BF16 and g.attrs.mesh == ()
    att = AttentionAttrs.of(g.node("model.layers.0.self_attn"))
    assert (att.num_heads, att.num_kv_heads, att.rope_theta, att.rope_scaling) == (4, 2, 1e6, None)
    # moe shares the experts' and the router's fields, so their readers take it as well.
    experts = ExpertsAttrs.of(g.node("model.layers.1.mlp.experts"))
    router = RouterAttrs.of(g.node("model.layers.1.mlp.gate"))
    moe = MoeAttrs(
        hidden=experts.hidden,
        num_experts=experts.num_experts,
        top_k=experts.top_k,
        intermediate_size=experts.intermediate_size,
        activation=experts.activation,
        layer=experts.layer,
        n_group=router.n_group,
        topk_group=router.topk_group,
        norm_topk_prob=router.norm_topk_prob,
        routed_scaling_factor=2,  # an int where a float is typed: stored as a float
        scoring=router.scoring,
        shared_intermediate_size=0,
    )
    node = Node("m", Op.MOE, ("x",), (), moe)
    assert ExpertsAttrs.of(node).top_k == RouterAttrs.of(node).top_k == 2
    # Defaults mean "absent" and are not printed; required fields always are.
    assert dict(moe.items())["shared_intermediate_size"] == 0 and "stage" not in dict(moe.items())
    assert isinstance(moe.routed_scaling_factor, float)
    assert LinearAttrs(in_features=2, out_features=2).items() == (("in_features", 2), ("out_features", 2))
    spec = ShardSpec("tp", 0, (4,), (1,))
    p = Param("w", (4, 4), DType.F32, ParamRole.WEIGHT, attrs=ParamAttrs(shard=(spec,), checkpoint=False))
    assert format_param(p) == 'w: f32[4,4] {checkpoint=false, shard=(("tp", 0, (4,), (1,), ()),)}'
    assert format_param(p.with_attrs(shard=None, checkpoint=None)) == "w: f32[4,4]"
