"""quantize-fp8: which GEMMs become FP8 (and which never do), scale shapes per recipe and per
fused component, exclusion patterns, plans whose block scales cannot be split, and the serving
stacks' 128 rule (kept BF16 by default, refused with strict=true)."""

import pytest

from glmc import presets
from glmc.ir import DType, GemmAttrs, Graph, ParamRole, count_params, shard_specs, weight_bytes
from glmc.lower import lower
from glmc.passes import PassError
from glmc.pipeline import run_pipeline
from glmc.spec import ModelSpec


@pytest.fixture(scope="module")
def glm45() -> Graph:
    return lower(presets.get("glm-4.5"))


def _quantized(g: Graph) -> set[str]:
    return {fqn for fqn, _, p in g.params() if p.attrs.quant is not None}


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
    assert qkv.dtype is DType.F8E4M3 and qkv.attrs.quant == "block128"
    s = att.param("qkv_proj.weight_scale_inv")
    assert s.role is ParamRole.SCALE and s.dtype is DType.F32 and s.shape == (96 + 8 + 8, 40)
    moe = g.node("model.layers.3.mlp")
    assert moe.param("experts.gate_up_proj_scale_inv").shape == (160, 12 + 12, 40)  # per expert, per half
    assert moe.param("experts.down_proj_scale_inv").shape == (160, 40, 12)
    c = run_pipeline(glm45, "fuse-moe,quantize-fp8{recipe=channel}").node("model.layers.3.mlp")
    assert c.param("experts.gate_up_proj_scale").shape == (160, 3072, 1)
    assert GemmAttrs.of(c).act_quant == "dynamic_per_token"


def test_fused_segments_keep_their_own_blocks() -> None:
    # glm-tiny's k and v have 64 rows: each gets its own (partial) block row (serving=false:
    # the serving stacks' 128 rule would keep every glm-tiny weight in BF16).
    g = run_pipeline(lower(presets.get("glm-tiny")), "fuse-moe,quantize-fp8{serving=false}")
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
            "fuse-moe,shard{tp=2},quantize-fp8{serving=false}",
            "splits the rows of model.layers.0.self_attn.qkv_proj.weight into pieces of 64",
        ),
        (
            "fuse-moe,shard{tp=2},quantize-fp8{strict=true}",
            "model.layers.0.self_attn.qkv_proj.weight has output size 64 per rank (tp=2), not a multiple of 128",
        ),
        (
            "quantize-fp8{strict=true}",
            "model.layers.0.self_attn.q_proj.weight has input size 64, not a multiple",
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
        run_pipeline(glm45, "fuse-moe,shard{tp=8},quantize-fp8{serving=false}")
    # By default those 192-row pieces stay BF16: no serving stack runs them as block FP8.
    g8 = run_pipeline(glm45, "fuse-moe,shard{tp=8},quantize-fp8")
    kept = g8.node("model.layers.3.mlp").param("experts.gate_up_proj")
    assert kept.dtype is DType.BF16 and kept.attrs.fp8_kept == "output size 192 per rank (tp=8)"


def _per_rank_sizes(g: Graph, fqn: str) -> list[int]:
    """Output sizes (per fused component) and the input size of one rank's piece, from the
    placements alone (an independent restatement of the rule the pass applies)."""
    mesh = dict(g.attrs.mesh)
    _, _, p = next(x for x in g.params() if x[0] == fqn)
    rows = list(p.attrs.segments or [p.shape[-2]])
    if p.role is ParamRole.EXPERT and p.name.endswith("gate_up_proj"):
        rows = [p.shape[-2] // 2] * 2
    cols = p.shape[-1]
    for s in shard_specs(p):
        if s.index:
            continue
        if s.dim == len(p.shape) - 2:
            rows = [seg // (mesh[s.axis] // rep) for seg, rep in zip(s.segments, s.replicas, strict=True)]
        elif s.dim == len(p.shape) - 1:
            cols //= mesh[s.axis]
    return [*rows, cols]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_fp8_weight_fits_the_serving_rule_on_glm45_air(tp: int) -> None:
    """GLM-4.5-Air: the 10944-wide dense MLP stays BF16 at every tp; every FP8 weight's per-rank
    output and input sizes are multiples of 128; the kept ones are exactly those that are not."""
    g = run_pipeline(lower(presets.get("glm-4.5-air")), f"fuse-moe,shard{{tp={tp}}},quantize-fp8")
    kept = set(g.attrs.fp8_kept)
    assert {"model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight"} <= kept
    n_fp8 = 0
    for fqn, _, p in g.params():
        if p.role not in (ParamRole.WEIGHT, ParamRole.EXPERT) or len(p.shape) < 2:
            continue
        fits = all(size % 128 == 0 for size in _per_rank_sizes(g, fqn))
        if p.attrs.quant is not None:
            assert fits, fqn
            n_fp8 += 1
        elif fqn in kept:
            assert not fits, fqn
    assert n_fp8 > 0
    if tp == 1:  # only the dense MLP: attention (96 x 128 heads), experts (1408 = 11 x 128) fit
        assert kept == {"model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight"}


def test_unfused_groups_are_kept_whole() -> None:
    """A q/k/v or gate/up group is one layer in the serving stacks: one member that does not fit
    keeps its siblings in BF16 too, each saying why."""
    data = presets.get("glm-tiny").model_dump(mode="json")
    data |= {"hidden_size": 128, "mlp": {"intermediate_size": 256}}
    data["attention"] |= {"num_heads": 2, "num_kv_heads": 1, "head_dim": 64}  # q 128 rows, k/v 64
    data["moe"] |= {"intermediate_size": 128, "n_group": 1, "topk_group": 1}
    g = run_pipeline(lower(ModelSpec.from_dict(data)), "quantize-fp8")
    att = g.node("model.layers.0.self_attn")
    assert att.param("k_proj.weight").attrs.fp8_kept == "output size 64"
    assert att.param("q_proj.weight").attrs.fp8_kept == "kept with k_proj (output size 64)"
    assert att.param("q_proj.weight").dtype is DType.BF16
    assert att.param("o_proj.weight").attrs.quant == "block128"  # 128 x 128 fits
    assert g.node("model.layers.0.mlp").param("gate_proj.weight").attrs.quant == "block128"
