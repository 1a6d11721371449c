"""quantize-fp8: which GEMMs become FP8 (and which never do), scale shapes per recipe and per
fused component, exclusion patterns, and plans whose block scales cannot be split."""

import pytest

from glmc import presets
from glmc.ir import DType, Graph, ParamRole, count_params, shard_specs, weight_bytes
from glmc.lower import lower
from glmc.passes import PassError
from glmc.pipeline import run_pipeline


@pytest.fixture(scope="module")
def glm45() -> Graph:
    return lower(presets.get("glm-4.5"))


def _quantized(g: Graph) -> set[str]:
    return {fqn for fqn, _, p in g.params() if p.attr("quant", None) is not None}


def test_default_exclusions_follow_the_reference(glm45: Graph) -> None:
    g = run_pipeline(glm45, "quantize-fp8")
    q = _quantized(g)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.3.mlp.experts.gate_up_proj",
        "model.layers.3.mlp.shared_experts.down_proj.weight",
        "model.mtp.0.self_attn.v_proj.weight",
    ):
        assert name in q, name
    for fqn, _, p in g.params():
        if p.role in (ParamRole.EMBEDDING, ParamRole.OUTPUT, ParamRole.ROUTER, ParamRole.ROUTER_BIAS,
                      ParamRole.NORM, ParamRole.BIAS):  # fmt: skip
            assert fqn not in q, fqn
    assert "model.mtp.0.eh_proj.weight" not in q
    assert "model.mtp.0.shared_head.head.weight" not in q
    assert count_params(g) == count_params(glm45)  # scales are not parameters
    assert weight_bytes(g) < 0.6 * weight_bytes(glm45)


def test_scale_shapes_per_recipe_and_component(glm45: Graph) -> None:
    g = run_pipeline(glm45, "fuse-moe,quantize-fp8")
    att = g.node("model.layers.3.self_attn")
    qkv = att.param("qkv_proj.weight")
    assert qkv.dtype is DType.F8E4M3 and qkv.attr("quant") == "block128"
    s = att.param("qkv_proj.weight_scale_inv")
    assert s.role is ParamRole.SCALE and s.dtype is DType.F32 and s.shape == (96 + 8 + 8, 40)
    moe = g.node("model.layers.3.mlp")
    assert moe.param("experts.gate_up_proj_scale_inv").shape == (160, 12 + 12, 40)  # per expert, per half
    assert moe.param("experts.down_proj_scale_inv").shape == (160, 40, 12)
    c = run_pipeline(glm45, "fuse-moe,quantize-fp8{recipe=channel}").node("model.layers.3.mlp")
    assert c.param("experts.gate_up_proj_scale").shape == (160, 3072, 1)
    assert c.attr("act_quant") == "dynamic_per_token"


def test_fused_segments_keep_their_own_blocks() -> None:
    # glm-tiny's k and v have 64 rows: each gets its own (partial) block row.
    g = run_pipeline(lower(presets.get("glm-tiny")), "fuse-moe,quantize-fp8")
    assert g.node("model.layers.0.self_attn").param("qkv_proj.weight_scale_inv").shape == (1 + 1 + 1, 1)
    assert g.node("model.layers.0.mlp").param("gate_up_proj.weight_scale_inv").shape == (2, 1)


def test_exclude_patterns_in_either_spelling(glm45: Graph) -> None:
    g = run_pipeline(glm45, "quantize-fp8{exclude=*.shared_experts.*|model.layers.92.*}")
    q = _quantized(g)
    assert not any(".shared_experts." in n or n.startswith("model.mtp.") for n in q)
    assert "model.layers.91.mlp.experts.gate_up_proj" in q


@pytest.mark.parametrize(
    ("pipeline", "needle"),
    [
        ("quantize-fp8{exclude=*.q_proj}", "exclude all of a group or none"),
        ("quantize-fp8{exclude=*.nothing_like_this}", "matches no GEMM weight"),
        (
            "fuse-moe,shard{tp=2},quantize-fp8",
            "splits the rows of model.layers.0.self_attn.qkv_proj.weight into pieces of 64",
        ),
    ],
)
def test_bad_quantization_plans(pipeline: str, needle: str) -> None:
    with pytest.raises(PassError) as e:
        run_pipeline(lower(presets.get("glm-tiny")), pipeline)
    assert needle in str(e.value)


def test_channel_scales_follow_any_tp_split() -> None:
    g = run_pipeline(lower(presets.get("glm-tiny")), "fuse-moe,shard{tp=2},quantize-fp8{recipe=channel}")
    att = g.node("model.layers.0.self_attn")
    assert [s.axis for s in shard_specs(att.param("qkv_proj.weight_scale"))] == ["tp"]
    assert shard_specs(att.param("o_proj.weight_scale")) == ()  # column split: per-row scales replicate


def test_block_scales_split_with_128_aligned_pieces(glm45: Graph) -> None:
    g = run_pipeline(glm45, "fuse-moe,shard{tp=4,ep=8},quantize-fp8")
    moe = g.node("model.layers.3.mlp")
    specs = {s.axis: s for s in shard_specs(moe.param("experts.gate_up_proj_scale_inv"))}
    assert specs["tp"].segments == (12, 12)  # 1536 / 4 = 384 rows = 3 blocks per rank and half
    assert specs["ep"].index == shard_specs(moe.param("experts.gate_up_proj"))[0].index
    with pytest.raises(PassError, match=r"experts\.gate_up_proj into pieces of 192"):
        run_pipeline(glm45, "fuse-moe,shard{tp=8},quantize-fp8")
