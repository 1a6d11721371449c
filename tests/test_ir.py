from dataclasses import replace
from pathlib import Path

import pytest

from glmc import presets
from glmc.ir import (
    DType,
    Graph,
    Node,
    Op,
    Param,
    ParamRole,
    VerifyError,
    count_params,
    flops_per_token,
    format_graph,
    kv_cache_bytes_per_token,
    make_attrs,
    rewrite,
    verify,
)
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
    m = n.with_attrs(note="hi")
    assert m.attr("note") == "hi" and n.attr("note", None) is None


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
    a = Node("a", Op.INPUT, attrs=make_attrs(name="a"))
    with pytest.raises(VerifyError, match="duplicate node name"):
        verify(Graph("g", (a, a, Node("o", Op.OUTPUT, ("a",)))))
    with pytest.raises(VerifyError, match="no output"):
        verify(Graph("g", (a,)))


def test_rewrite_forwards_renamed_outputs():
    w = Param("weight", (4, 4), DType.F32, ParamRole.WEIGHT)
    g = Graph(
        "g",
        (
            Node("x", Op.INPUT, attrs=make_attrs(name="x")),
            Node("lin", Op.LINEAR, ("x",), (w,), make_attrs(in_features=4, out_features=4)),
            Node("out", Op.OUTPUT, ("lin",)),
        ),
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
