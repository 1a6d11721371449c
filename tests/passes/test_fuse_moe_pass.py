"""fuse-moe: one moe node per MoE layer (router, routed and shared experts), fused q/k/v and
gate/up; parameter counts, FLOPs and the names of unfused parameters unchanged."""

import pytest

from glmc import presets
from glmc.ir import MoeAttrs, Op, count_params, flops_per_token, verify
from glmc.lower import lower
from glmc.passes import FuseMoE, PassError
from glmc.spec import ModelSpec


def _spec(name: str, **update: object) -> ModelSpec:
    data = presets.get(name).model_dump()
    for k, v in update.items():
        if isinstance(v, dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return ModelSpec.from_dict(data)


@pytest.mark.parametrize("name", ["glm-tiny", "glm-4.5", "glm-4.5-air"])
def test_structure_and_invariants(name: str) -> None:
    g = lower(presets.get(name))
    f = verify(FuseMoE().apply(g))
    moe_layers = g.attrs.num_layers - g.attrs.num_dense_layers + g.attrs.num_mtp_layers
    assert len(f.find(Op.MOE)) == moe_layers
    assert not f.find(Op.ROUTER) and not f.find(Op.EXPERTS)
    assert count_params(f) == count_params(g)
    assert flops_per_token(f) == flops_per_token(g)
    assert f.attrs.weight_layout == "fused"
    names = {fqn for fqn, _, _ in f.params()}
    last = f"model.layers.{g.attrs.num_layers - 1}.mlp"
    assert f"{last}.experts.gate_up_proj" in names and f"{last}.gate.weight" in names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)


def test_fused_params_record_their_components() -> None:
    f = FuseMoE().apply(lower(presets.get("glm-tiny")))
    att = f.node("model.layers.0.self_attn")
    qkv = att.param("qkv_proj.weight")
    assert qkv.shape == (256, 64) and qkv.attrs.segments == (128, 64, 64)
    assert qkv.attrs.fused == ("q_proj.weight", "k_proj.weight", "v_proj.weight")
    assert att.param("qkv_proj.bias").attrs.fused == ("q_proj.bias", "k_proj.bias", "v_proj.bias")
    moe = f.node("model.layers.1.mlp")
    assert moe.inputs == ("model.layers.1.post_attention_layernorm",)
    shared = moe.param("shared_experts.gate_up_proj.weight")
    assert shared.attrs.fused == ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight")
    assert MoeAttrs.of(moe).routed_scaling_factor == 2.5 and MoeAttrs.of(moe).shared_intermediate_size == 32
    assert f.node("model.layers.1").inputs == ("model.layers.1.attn_residual", "model.layers.1.mlp")


def test_without_shared_experts_or_biases() -> None:
    s = _spec("glm-tiny", moe={"num_shared_experts": 0}, attention={"qkv_bias": False})
    f = verify(FuseMoE().apply(lower(s)))
    moe = f.node("model.layers.1.mlp")
    assert MoeAttrs.of(moe).shared_intermediate_size == 0
    assert not any(p.name.startswith("shared_experts") for p in moe.params)
    # The block's residual add read the experts node; it now reads the moe node.
    assert f.node("model.layers.1").inputs[1] == "model.layers.1.mlp"
    assert not f.node("model.layers.0.self_attn").has_param("qkv_proj.bias")


def test_fusing_twice_is_refused() -> None:
    f = FuseMoE().apply(lower(presets.get("glm-tiny")))
    with pytest.raises(PassError, match="already fused"):
        FuseMoE().apply(f)
